"""The fewseg import graph, read from the source: one-way, and the source of each stage's code digest."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fewseg
from fewseg.config import MODULE_STAGES, STAGE_ENTRY_POINTS, stage_digests, stage_modules
from fewseg.imports import entry_closure, find_cycle, import_graph

PACKAGE = Path(fewseg.__file__).resolve().parent


def _package(root: Path, files: dict[str, str], name: str = "pkg") -> Path:
    package = root / name
    package.mkdir()
    for module, text in files.items():
        (package / f"{module}.py").write_text(text)
    return package


def test_the_fewseg_import_graph_is_one_way():
    graph = import_graph(PACKAGE)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # The graph is read, not assumed: these edges exist (the first two inside functions).
    assert "distributed" in graph["stages"] and "train" in graph["distributed"]
    assert {"collectives", "runtime"} <= graph["train"]


def test_every_import_form_is_an_edge_and_a_cycle_is_reported(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__": "VERSION = 1\n",
            "a": "import pkg.b\nfrom pkg import VERSION\n",
            "b": "def f():\n    from pkg.c import g\n    return g\n",
            "c": "from . import d\n",
            "d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n\n"
            "def h():\n    from pkg import a\n",
            "e": "from .a import x\n",
        },
    )
    graph = import_graph(pkg)
    assert graph == {"__init__": set(), "a": {"b", "__init__"}, "b": {"c"}, "c": {"d"}, "d": {"a"}, "e": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "d", "a"]  # through two function-level imports
    graph["d"] = set()
    assert find_cycle(graph) is None
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_an_entry_point_runs_its_helpers_imports_but_not_other_entry_points(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "stages": "from pkg import base\n\ndef _helper():\n    from pkg import heavy\n\n"
            "def one():\n    _helper()\n\ndef two():\n    from pkg import other\n",
            "base": "",
            "heavy": "import pkg.deep\n",
            "deep": "",
            "other": "",
        },
    )
    assert entry_closure("stages", ["one"], pkg) == {"stages", "base", "heavy", "deep"}
    assert entry_closure("stages", ["two"], pkg) == {"stages", "base", "other"}
    with pytest.raises(ValueError, match="no top-level function three"):
        entry_closure("stages", ["three"], pkg)


def test_stage_closures_follow_the_imports():
    modules = stage_modules(PACKAGE)
    assert set(modules) == set(STAGE_ENTRY_POINTS) | set(MODULE_STAGES)
    assert all({"stages", "io", "runtime", "allocator"} <= set(m) for m in modules.values())
    assert "runtime" in modules["train"] and "runtime" in modules["infer"]
    assert {"infer", "model", "data", "checkpoints", "model_config"} <= set(modules["infer"])
    assert {"train", "distributed", "collectives", "prompt", "weights"} <= set(modules["train"])
    assert "train" not in modules["infer"] and "infer" not in modules["train"]
    assert modules["demo"] == ["allocator", "demo", "errors", "io", "runtime", "stages"]
    assert "config" not in set().union(*modules.values())  # editing the config code reruns no job by itself


def test_editing_a_module_that_inference_imports_reruns_inference(tmp_path):
    copy = tmp_path / "fewseg"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "schemas"))
    before = stage_digests(copy)
    assert before == stage_digests(PACKAGE)
    runtime = copy / "runtime.py"
    runtime.write_text(runtime.read_text() + "\n# edited\n")
    after = stage_digests(copy)
    changed = {kind for kind in before if before[kind] != after[kind]}
    assert changed == set(STAGE_ENTRY_POINTS) | set(MODULE_STAGES)  # every stage runs through runtime's log stream
    before = after
    model_config = copy / "model_config.py"  # infer -> model -> model_config: two imports away
    model_config.write_text(model_config.read_text() + "\n# edited\n")
    after = stage_digests(copy)
    assert {kind for kind in before if before[kind] != after[kind]} == {"train", "infer", "pretrain"}


def test_the_snakefile_and_the_stages_import_no_torch():
    """config.py (read by the Snakefile) and stages.py (before a job sets its threads) stay torch-free."""
    code = "import sys, fewseg.config, fewseg.stages; fewseg.config.stage_digests(); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
