"""Conda wiring without conda: every rule names the environment, the environment lists what the code imports, and
``--sdm conda`` plans the environment with a stub ``conda`` on PATH (these machines have no conda channels)."""

import ast
import os
import re
import stat
import sys
from pathlib import Path

import pytest
import yaml
from workflow_utils import ROOT, TEST_CONFIG, snakemake

ENV_FILE = ROOT / "envs" / "fewseg.yaml"
# import name -> conda-forge package name, where they differ
CONDA_NAMES = {"torch": "pytorch", "PIL": "pillow", "yaml": "pyyaml", "matplotlib": "matplotlib-base"}
# packages the environment needs although no module imports them by name
INDIRECT = {"torchvision"}  # timm imports it

STUB = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls.log"
case "$1" in
  --version) echo "conda 24.11.3";;
  info) echo '{"envs_dirs": ["'"$(dirname "$0")"'/envs"], "conda_prefix": "/opt/conda", "platform": "linux-64",
    "conda_version": "24.11.3", "root_prefix": "/opt/conda"}';;
  config) echo '{"get": {"channel_priority": "strict"}, "rc_path": "", "success": true, "warnings": []}';;
  *) echo '{}';;
esac
"""


def _env_packages() -> dict[str, str]:
    deps = yaml.safe_load(ENV_FILE.read_text())["dependencies"]
    out = {}
    for dep in deps:
        name, _, version = str(dep).partition(" ")
        out[name.strip()] = version.strip()
    return out


def _third_party_imports(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    local = {"fewseg", "_bootstrap"}
    return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def test_every_rule_uses_the_environment():
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        envs = re.findall(r'conda:\n\s+"\.\./envs/fewseg\.yaml"', text)
        assert len(envs) == len(rules), f"{smk.name}: {len(rules)} rules, {len(envs)} name envs/fewseg.yaml"


def test_environment_lists_every_imported_package_pinned():
    packages = _env_packages()
    code = [*(ROOT / "fewseg").glob("*.py"), *(ROOT / "workflow_scripts").glob("*.py")]
    needed = {CONDA_NAMES.get(m, m) for m in _third_party_imports(code)} | INDIRECT
    missing = sorted(needed - set(packages))
    assert not missing, f"{ENV_FILE.name} lacks {missing}"
    unpinned = sorted(name for name, version in packages.items() if not version)
    assert not unpinned, f"unpinned packages in {ENV_FILE.name}: {unpinned}"
    assert "conda-forge" in yaml.safe_load(ENV_FILE.read_text())["channels"]


@pytest.mark.slow
def test_dry_run_with_conda_plans_the_environment(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "conda"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    workdir = tmp_path / "work"
    workdir.mkdir()
    r = snakemake(workdir, "-n", "--sdm", "conda", "--cores", "1", "--", "results/submission.zip",
                  configfile=TEST_CONFIG, env=env)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "envs/fewseg.yaml will be created" in out
    assert "info --json" in (bindir / "calls.log").read_text()


def test_fewseg_imports_from_the_checkout_without_installation(tmp_path):
    """Inside a conda environment fewseg is not installed: the scripts' bootstrap finds the checkout."""
    import subprocess

    code = "import runpy, sys; sys.path.insert(0, sys.argv[1]); import _bootstrap, fewseg; print(fewseg.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-S", "-c", code, str(ROOT / "workflow_scripts")], capture_output=True, text=True, env=env
    )
    # -S hides site-packages (and any installed fewseg); numpy etc. are not needed to import the package itself
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().parent == (ROOT / "fewseg").resolve()
