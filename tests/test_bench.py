"""The bench scripts run and print their tables (at smoke sizes: these tests time nothing)."""

import json
import subprocess
import sys

import pytest
from workflow_utils import ROOT

pytestmark = pytest.mark.slow  # runs both bench scripts in subprocesses


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_model_bench_runs_both_sides(tmp_path):
    rows_json = tmp_path / "rows.json"
    out = _run("bench/model_bench.py", "--models", "smoke", "--tasks", "fwd1", "--envs", "keep",
               "--repeats", "1", "--query-only", "--threads", "1", "--precisions", "fp32",
               "--json", str(rows_json))  # fmt: skip
    rows = json.loads(rows_json.read_text())
    assert [(r["task"], r["env"]) for r in rows] == [("fwd b1", "keep")]
    for r in rows[:1]:
        assert r["max_abs_diff_fewseg"] < 1e-4 and r["max_abs_diff_fewseg_q"] < 1e-4, r
        assert r["fewseg_q"]["seconds"] > 0
    assert all(r["ref"]["peak_rss"] > 0 and r["fewseg"]["seconds"] > 0 for r in rows)
    assert sum(line.startswith("smoke") for line in out.splitlines()) == 1


def test_model_bench_reports_a_side_that_does_not_fit_instead_of_crashing(tmp_path):
    rows_json = tmp_path / "rows.json"
    out = _run("bench/model_bench.py", "--models", "smoke", "--tasks", "fwd1", "--envs", "keep", "--repeats", "1",
               "--threads", "1", "--precisions", "fp32", "--max-rss-gb", "0.01", "--json", str(rows_json))  # fmt: skip
    (row,) = json.loads(rows_json.read_text())
    assert row["ref"] == row["fewseg"] == {"error": "peak resident memory passed 0.0 GB"}
    (line,) = [line for line in out.splitlines() if line.startswith("smoke")]
    assert "did not fit" in line and "no ratio" in line


def test_infer_bench_prints_ratios_on_the_test_config():
    out = _run("bench/infer_bench.py", "--config", "tests/config.test.yaml", "--queries", "1", "--threads", "1")
    speed, precision = out.split("\n\n")
    lines = [line for line in speed.splitlines() if line.startswith(("base", "novel"))]
    assert len(lines) == 5  # base and four novel classes
    for line in lines:
        assert line.split()[-3].endswith("x"), line
    novel_agreement = [float(line.split()[-2].rstrip("%")) for line in lines[1:]]
    assert min(novel_agreement) >= 99.9  # same work, same pixels (up to float ties)
    # fp32 beside bf16 where bf16 is native; otherwise the reason, never an emulated figure
    from fewseg.runtime import native_bf16

    native, why = native_bf16(__import__("torch").device("cpu"))
    rows = [line for line in precision.splitlines() if line.startswith(("base", "novel"))]
    if native:
        assert len(rows) == 5 and all(line.split()[-3].endswith("x") for line in rows), precision
    else:
        assert rows == [] and f"skipped: {why}" in precision


def test_incontext_bench_scores_the_shipped_weights_above_the_floor():
    out = _run("bench/incontext_bench.py", "--episodes", "8", "--ranges", "2-3", "--threads", "1")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[1:2] == ["2-3"]}
    assert set(rows) == {"palette", "binary"}
    for kind, row in rows.items():
        miou, floor = float(row[1]), float(row[2])
        assert 0.0 <= floor <= 1.0 and 0.0 <= miou <= 1.0
        # the shipped model reads its prompt: better than painting the prompt's main class, or marking everything
        assert miou > floor, kind


def test_optim_bench_prints_both_sides_and_finds_the_same_weights():
    out = _run("bench/optim_bench.py", "--preset", "micro", "--repeats", "1", "--steps", "3")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert set(rows) == {"fewseg", "torch"}
    assert rows["fewseg"][-2] == "False" and rows["torch"][-2] == "True"  # which side imports torch._dynamo
    assert out.strip().endswith("identical to the bit: True")
