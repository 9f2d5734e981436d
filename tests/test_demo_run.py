"""The README's main command: the whole demo, default config.yaml, from nothing to the zip and the metric.

This is the one full-size run of the suite (a few minutes on 2 cores); every other workflow test uses the tiny
test config."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from workflow_utils import ROOT, snakemake

pytestmark = pytest.mark.workflow


def test_demo_runs_end_to_end_and_learns(tmp_path):
    configfile = ROOT / "config.yaml"
    r = snakemake(tmp_path, "--cores", "2", configfile=configfile, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    queries = json.loads((tmp_path / "results/converted/split/query.json").read_text())["queries"]
    with zipfile.ZipFile(tmp_path / "results/submission.zip") as zf:
        assert zf.namelist() == sorted(f"{q['stem']}.png" for q in queries)
        for q in queries:
            with zf.open(f"{q['stem']}.png") as fh, Image.open(fh) as im:
                ids = np.asarray(im)
            assert ids.shape == (q["height"], q["width"]) and ids.dtype == np.uint8 and ids.max() <= 11
    metrics = json.loads((tmp_path / "results/metrics.json").read_text())
    # An untrained model scores 0.006 base mIoU here; the demo's training must be visible in the metric.
    assert metrics["base_miou"] > 0.4, metrics
    # Started from the shipped in-context weights, learned prompts find novel classes (from scratch: 0.000).
    assert metrics["novel_miou"] > 0.05, metrics
    ablation = json.loads((tmp_path / "results/ablation/prompts.json").read_text())
    assert any(row["learned_iou"] > row["pair_iou"] for row in ablation["classes"]), ablation
    assert "runtime/precision auto:" in (tmp_path / "results/logs/train_base.log").read_text()
    again = snakemake(tmp_path, "-n", "--cores", "2", configfile=configfile)
    assert "Nothing to be done" in again.stdout + again.stderr
