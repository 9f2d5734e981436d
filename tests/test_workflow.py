"""The workflow end to end on the tiny test config: outputs, a no-op second run, and reruns of exactly what a
config change invalidates."""

import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from workflow_utils import (
    ROOT,
    load_test_config,
    modified,
    output_mtimes,
    planned_jobs,
    snakemake,
    write_config,
)

pytestmark = pytest.mark.workflow

STAGES = {
    "make_demo_dataset", "convert_train_masks", "split_support", "embed_tiles", "rank_prompts", "train_base",
    "select_support_pair", "train_prompt_phase1", "train_prompt_phase2", "infer_base", "infer_novel",
    "infer_novel_pair", "overlay_step", "make_submission", "evaluate", "compare_prompts", "job_statistics",
    "measure_background",
}  # fmt: skip


# The shared local run stays as it was made: (b) reruns in a copy of it, every other test only reads it or plans
# (dry runs), so no test depends on which ran before it.
B_CHANGE = {"prompt_training.classes.10.stride": 12}


@pytest.fixture(scope="module")
def run(local_run):
    return local_run.workdir, local_run.config, local_run.configfile


def test_dry_run_lists_every_stage(tmp_path):
    jobs = planned_jobs(tmp_path, write_config(tmp_path / "c.yaml", load_test_config()))
    assert STAGES <= set(jobs)
    assert jobs["train_prompt_phase1"] == jobs["train_prompt_phase2"] == jobs["infer_novel"] == 4
    assert jobs["select_support_pair"] == jobs["infer_novel_pair"] == 4
    assert jobs["overlay_step"] == 4 and jobs["embed_tiles"] == 3
    assert jobs["measure_background"] == 1  # the test config decides class 10's background check from its support


@pytest.mark.parametrize(
    "args",
    [
        ["-n", "results/submission.zip"],
        ["results/submission.zip", "-nq"],  # the two forms the README gives for a quiet dry run
        ["-n", "-q", "--", "results/submission.zip"],
    ],
)
def test_dry_run_of_the_submission_as_a_user_types_it(tmp_path, args):
    """In a checkout with the default config and profile, the target named on the command line."""
    for name in ("Snakefile", "rules", "workflow_scripts", "config.yaml", "profiles", "resources"):
        (tmp_path / name).symlink_to(ROOT / name)
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    if not any(a in ("-q", "-nq") for a in args):  # quiet runs print no job list
        assert "make_submission" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()  # a dry run writes no output


def test_the_small_jobs_take_one_core_each_and_base_training_starts_first(tmp_path):
    """On 2 cores, base training takes both and starts before anything it does not need; the per-class and
    per-tile-set jobs, base inference included, take one each, and base inference with what it reads runs before
    the prompt chains, so that it does not end the run alone (rules/common.smk)."""
    for name in ("Snakefile", "rules", "workflow_scripts", "config.yaml", "profiles", "resources"):
        (tmp_path / name).symlink_to(ROOT / name)
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    threads: dict[str, set[int]] = {}
    priority: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", r.stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        if rule:
            for key, seen in (("threads", threads), ("priority", priority)):
                found = re.search(rf"^\s+{key}: (\d+)$", block, re.M)
                seen.setdefault(rule.group(1), set()).add(int(found.group(1)) if found else int(key == "threads"))
    small = ("embed_tiles", "select_support_pair", "train_prompt_phase1", "train_prompt_phase2", "infer_novel",
             "infer_novel_pair", "measure_background", "infer_base")  # fmt: skip
    assert all(threads[name] == {1} for name in small), threads
    assert threads["train_base"] == {2}
    (top,) = priority["train_base"]
    assert all(max(p) < top for rule, p in priority.items() if rule != "train_base"), priority
    chain = max(max(priority[r]) for r in ("select_support_pair", "train_prompt_phase1", "infer_novel"))
    assert all(min(priority[r]) > chain for r in ("embed_tiles", "rank_prompts", "infer_base")), priority
    assert max(priority["infer_novel_pair"]) < min(priority["measure_background"]) <= chain


def test_submission_zip_is_what_the_challenge_wants(run):
    workdir, _, _ = run
    queries = json.loads((workdir / "results/converted/split/query.json").read_text())["queries"]
    final = workdir / "results/predictions/overlay_4"  # the last overlay step: the prediction that is submitted
    with zipfile.ZipFile(workdir / "results/submission.zip") as zf:
        names = zf.namelist()
        assert names == sorted(f"{q['stem']}.png" for q in queries)
        for q in queries:
            with zf.open(f"{q['stem']}.png") as fh, Image.open(fh) as im:
                assert im.mode == "L"
                ids = np.asarray(im)
            assert ids.shape == (q["height"], q["width"])
            assert ids.max() <= 11
            with Image.open(final / f"{q['stem']}.png") as im:
                assert np.array_equal(ids, np.asarray(im)), q["stem"]


def test_metrics_file_and_table(run):
    workdir, _, _ = run
    metrics = json.loads((workdir / "results/metrics.json").read_text())
    for key in ("base_miou", "novel_miou", "score", "per_class"):
        assert key in metrics
    assert metrics["score"] == pytest.approx(0.4 * metrics["base_miou"] + 0.6 * metrics["novel_miou"])
    assert set(metrics["per_class"]) == {str(i) for i in range(12)}
    log = (workdir / "results/logs/evaluate.log").read_text()
    assert "base mIoU" in log and "sport field" in log


def test_ablation_compares_each_learned_prompt_with_its_support_pair(run):
    workdir, config, _ = run
    ablation = json.loads((workdir / "results/ablation/prompts.json").read_text())
    assert [row["class"] for row in ablation["classes"]] == config["classes"]["novel"]
    for row in ablation["classes"]:
        cls = row["class"]
        assert 0.0 <= row["learned_iou"] <= 1.0 and 0.0 <= row["pair_iou"] <= 1.0
        assert row["gain"] == pytest.approx(row["learned_iou"] - row["pair_iou"])
        pair = json.loads((workdir / f"results/predictions/pair_{cls}/prompt.json").read_text())
        assert pair["cls"] == cls and row["pair_held_out_iou"] == pair["best_held_out_iou"]
        # phase 1 started from the pair: its log says so
        assert "from the support pair" in (workdir / f"results/logs/train_prompt_phase1_{cls}.log").read_text()
    table = (workdir / "results/ablation/prompts.tsv").read_text().splitlines()
    assert table[0].split("\t")[:4] == ["class", "name", "learned_iou", "learned_held_out_iou"]
    assert len(table) == 1 + len(config["classes"]["novel"])


def test_auto_background_check_follows_the_share_measured_on_the_support_tiles(run):
    """The test config sets class 10 (third in the overlay order) to "auto"; the others are fixed."""
    workdir, config, _ = run
    assert config["overlay"]["background_check"][10] == "auto"
    measured = json.loads((workdir / "results/validation/background_10.json").read_text())
    support = json.loads((workdir / "results/converted/split/support.json").read_text())["10"]
    assert measured["cls"] == 10 and [t["stem"] for t in measured["tiles"]] == support
    assert measured["pixels"] == sum(t["pixels"] for t in measured["tiles"]) > 0
    assert measured["at_zero"] == sum(t["at_zero"] for t in measured["tiles"]) == measured["base_labels"].get("0", 0)
    assert measured["share"] == pytest.approx(measured["at_zero"] / measured["pixels"])
    step = json.loads((workdir / "results/predictions/overlay_3/overlay.json").read_text())
    assert step["cls"] == 10
    assert step["background_check"] is (measured["share"] >= config["overlay"]["min_background_share"])
    fixed = json.loads((workdir / "results/predictions/overlay_4/overlay.json").read_text())
    assert fixed == {"cls": 8, "background_check": False, "pasted": fixed["pasted"]}
    assert not (workdir / "results/validation/background_8.json").exists()  # measured only where asked


def test_background_measurement_refuses_embeddings_without_its_support_tiles(run, tmp_path):
    from types import SimpleNamespace

    from fewseg.config import background_settings, check_config
    from fewseg.io import InputError
    from fewseg.stages import measure_background

    workdir, config, _ = run
    r = workdir / "results"
    inputs = SimpleNamespace(
        model=str(r / "models/base.pt"), train=str(r / "converted/train"), support=str(r / "converted/split"),
        train_embeddings=str(r / "mapping/embeddings_train.npz"),
        support_embeddings=str(r / "mapping/embeddings_query.npz"),  # the wrong tile set
    )  # fmt: skip
    out = tmp_path / "background_10.json"
    params = {"settings": background_settings(check_config(config, check_paths=False), 10)}
    with pytest.raises(InputError, match="embeddings_query.npz.*no embedding for support tiles"):
        measure_background(inputs, [str(out)], params)
    assert not out.exists()


def test_predictions_carry_geotiffs_and_previews(run):
    import rasterio

    workdir, _, _ = run
    final = workdir / "results/predictions/overlay_4"
    queries = json.loads((workdir / "results/converted/split/query.json").read_text())["queries"]
    assert sorted(p.stem for p in final.glob("*.png")) == sorted(q["stem"] for q in queries)
    for q in queries:
        with rasterio.open(final / "geotiff" / f"{q['stem']}.tif") as src, rasterio.open(q["image"]) as image:
            assert src.count == 1
            assert (src.crs, src.transform) == (image.crs, image.transform)  # lies over the query in a GIS
            geotiff_ids = src.read(1)
        with Image.open(final / f"{q['stem']}.png") as im:
            assert np.array_equal(geotiff_ids, np.asarray(im))  # the same ids as the PNG
        with Image.open(final / "previews" / f"{q['stem']}.png") as im:
            assert im.size == (2 * q["width"] + 4, q["height"])  # image | 4 px gap | prediction


def test_second_run_has_nothing_to_do(run):
    workdir, _, configfile = run
    r = snakemake(workdir, "-n", "--cores", "1", configfile=configfile)
    assert r.returncode == 0
    assert "Nothing to be done" in r.stdout + r.stderr


def test_prompt_setting_reruns_exactly_that_class_downstream(local_run, tmp_path):
    """(b): class 10 is third in the overlay order 9, 11, 10, 8."""
    workdir, config = local_run.copy_to(tmp_path / "run"), local_run.config
    assert config["overlay"]["order"] == [9, 11, 10, 8]
    changed = modified(config, B_CHANGE)
    configfile = write_config(workdir / "test-config-b.yaml", changed)
    jobs = planned_jobs(workdir, configfile)
    assert jobs == {
        "train_prompt_phase1": 1, "train_prompt_phase2": 1, "infer_novel": 1, "overlay_step": 2,
        "make_submission": 1, "evaluate": 1, "compare_prompts": 1, "job_statistics": 1, "all": 1,
    }  # fmt: skip
    before = output_mtimes(workdir)
    r = snakemake(workdir, "--cores", "2", configfile=configfile)
    assert r.returncode == 0, r.stderr[-3000:]
    after = output_mtimes(workdir)
    touched = {p for p in after if before.get(p) != after[p]}
    expected_prefixes = (
        "results/prompts/10/", "results/predictions/novel_10/", "results/predictions/overlay_3/",
        "results/predictions/overlay_4/", "results/submission.zip", "results/metrics.json", "results/metrics.tsv",
        "results/ablation/", "results/job_statistics.tsv",
    )  # fmt: skip
    assert touched and all(p.startswith(expected_prefixes) for p in touched), sorted(touched)
    assert any(p.startswith("results/prompts/10/") for p in touched)
    untouched = set(before) - touched
    assert any(p.startswith("results/prompts/9/") for p in untouched)
    assert any(p.startswith("results/predictions/overlay_2/") for p in untouched)


def test_overlay_order_reruns_only_overlay_zip_and_evaluation(run, tmp_path):
    """(c)"""
    workdir, config, _ = run
    changed = modified(config, {"overlay.order": [9, 11, 8, 10]})
    jobs = planned_jobs(workdir, write_config(tmp_path / "test-config-c.yaml", changed))
    assert set(jobs) == {"overlay_step", "make_submission", "evaluate", "all"}  # job statistics stay as they are
    assert jobs["overlay_step"] == 2  # steps 3 and 4 changed class; steps 1 and 2 did not


def test_second_phase_setting_reruns_that_phase_and_not_the_first(run, tmp_path):
    workdir, config, _ = run
    changed = modified(config, {"prompt_training.classes.10.phase2": {"steps": 7, "lr": 1.0e-4}})
    jobs = planned_jobs(workdir, write_config(tmp_path / "test-config-phase2.yaml", changed))
    assert jobs == {
        "train_prompt_phase2": 1, "infer_novel": 1, "overlay_step": 2, "make_submission": 1, "evaluate": 1,
        "compare_prompts": 1, "job_statistics": 1, "all": 1,
    }  # fmt: skip


def test_mirrors_of_one_class_rerun_its_two_predictions_and_what_reads_them(run, tmp_path):
    """Its learned prompt's and its support pair's predictions (the ablation compares like with like); the base
    predictions and the prompts stand."""
    workdir, config, _ = run
    changed = modified(config, {"inference.novel.10.flips": 4})
    jobs = planned_jobs(workdir, write_config(tmp_path / "test-config-flips.yaml", changed))
    assert jobs == {
        "infer_novel": 1, "infer_novel_pair": 1, "overlay_step": 2, "make_submission": 1, "evaluate": 1,
        "compare_prompts": 1, "job_statistics": 1, "all": 1,
    }  # fmt: skip


def test_background_share_threshold_reruns_only_the_auto_step_and_after(run, tmp_path):
    workdir, config, _ = run
    changed = modified(config, {"overlay.min_background_share": 0.9})
    jobs = planned_jobs(workdir, write_config(tmp_path / "test-config-share.yaml", changed))
    assert set(jobs) == {"overlay_step", "make_submission", "evaluate", "all"}  # the measurement stands
    assert jobs["overlay_step"] == 2  # step 3 (class 10, auto) and step 4 after it


def test_base_training_setting_reruns_training_and_downstream_only(run, tmp_path):
    """(d)"""
    workdir, config, _ = run
    changed = modified(config, {"base_training.lr": 2.0e-3})
    jobs = planned_jobs(workdir, write_config(tmp_path / "test-config-d.yaml", changed))
    assert {"train_base", "train_prompt_phase1", "train_prompt_phase2", "infer_base", "infer_novel"} <= set(jobs)
    assert jobs["overlay_step"] == 4
    assert not {"make_demo_dataset", "convert_train_masks", "split_support", "embed_tiles", "rank_prompts"} & set(jobs)


def test_report_holds_metrics_curves_previews_and_job_statistics(run, tmp_path):
    workdir, _, configfile = run
    report = tmp_path / "report.html"
    r = snakemake(workdir, "--report", str(report), configfile=configfile)
    assert r.returncode == 0, r.stderr[-3000:]
    html = report.read_text(errors="replace")
    for item in ("metrics.tsv", "base_history.png", "job_statistics.tsv", "previews"):
        assert item in html, item
    stats = (workdir / "results/job_statistics.tsv").read_text().splitlines()
    assert stats[0].split("\t") == ["job", "wall_s", "cpu_s", "max_rss_mb", "mean_load"]
    assert any(line.startswith("train_base\t") for line in stats)
