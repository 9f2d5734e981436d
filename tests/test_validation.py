"""The whole-dataset check that every heavy job waits for (fewseg/validate.py), and YAML 1.1 numbers in configs."""

import copy
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from workflow_utils import (
    job_counts,
    load_test_config,
    modified,
    rewrite_raster,
    snakemake,
    support_label_of,
    write_config,
)

from fewseg.config import ConfigError, check_config, load_yaml
from fewseg.demo import make_demo_dataset
from fewseg.validate import DatasetErrors, DatasetSpec, validate_dataset

ROOT = Path(__file__).resolve().parent.parent
BASE, NOVEL = [1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good") / "data"
    make_demo_dataset(root, n_train=4, n_support_per_class=2, n_query=3, size=64, seed=3)
    return root


@pytest.fixture
def dataset(good_dataset, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(good_dataset, root)
    return root


def spec_of(root: Path, **changes) -> DatasetSpec:
    dataset = {"train_dir": "trainset", "test_dir": "testset", "shots": 2, "ignore_index": 255,
               "split_lists": None, "query_labels": "testset_query_labels"} | changes  # fmt: skip
    return DatasetSpec.from_settings(root, {"dataset": dataset, "base": BASE, "novel": NOVEL})


def query_images(root: Path) -> list[Path]:
    labelled = {p.stem for p in (root / "testset/labels").glob("*.tif")}
    return sorted(p for p in (root / "testset/images").glob("*.tif") if p.stem not in labelled)


# Each breaker damages one file of a good dataset and returns (file name, phrase the error must hold).


def truncated_query(root):
    path = query_images(root)[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name, "truncated"


def one_band_query(root):
    path = query_images(root)[1]
    rewrite_raster(path, lambda d: d[:1])
    return path.name, "expected 3 bands (RGB), found 1"


def float_support_image(root):
    path = root / "testset/images" / support_label_of(root, 10).name
    rewrite_raster(path, lambda d: d.astype(np.float32))
    return path.name, "expected uint8 pixels, found float32"


def support_class_without_pixels(root):
    path = support_label_of(root, 11)
    rewrite_raster(path, lambda d: np.where(d == 11, 0, d).astype(np.uint8))
    return path.name, "holds no novel-class pixel"


def support_label_without_image(root):
    label = support_label_of(root, 9)
    (root / "testset/images" / label.name).unlink()
    return label.name, "label has no image"


def train_label_out_of_range(root):
    path = sorted((root / "trainset/labels").glob("*.tif"))[0]
    rewrite_raster(path, lambda d: np.where(d == d.max(), 9, d).astype(np.uint8))
    return path.name, "outside the configured classes"


def train_label_wrong_size(root):
    path = sorted((root / "trainset/labels").glob("*.tif"))[1]
    rewrite_raster(path, lambda d: d[:, :-4])
    return path.name, "differs from its image"


def query_label_missing(root):
    path = sorted((root / "testset_query_labels").glob("*.tif"))[0]
    path.unlink()
    return path.name, "query label missing"


QUERY_SIDE = [truncated_query, one_band_query, float_support_image, support_class_without_pixels,
              support_label_without_image]  # fmt: skip
CASES = [*QUERY_SIDE, train_label_out_of_range, train_label_wrong_size, query_label_missing]


def test_good_dataset_passes_and_is_summarised(dataset, tmp_path):
    summary = validate_dataset(spec_of(dataset), cache_path=tmp_path / "cache.json")
    assert summary["train_tiles"] == 4 and summary["query_tiles"] == 3
    assert {c: len(s) for c, s in summary["support"].items()} == {"8": 2, "9": 2, "10": 2, "11": 2}


@pytest.mark.parametrize("breaker", CASES, ids=[c.__name__ for c in CASES])
def test_each_bad_input_is_named(breaker, dataset):
    name, phrase = breaker(dataset)
    with pytest.raises(DatasetErrors) as info:
        validate_dataset(spec_of(dataset))
    problems = [str(p) for p in info.value.problems]
    assert any(name in p and phrase in p for p in problems), problems


def test_every_problem_is_reported_at_once(dataset):
    expected = [breaker(dataset) for breaker in CASES]
    with pytest.raises(DatasetErrors) as info:
        validate_dataset(spec_of(dataset))
    text = str(info.value)
    for name, phrase in expected:
        assert any(name in line and phrase in line for line in text.splitlines()), (name, phrase, text)
    # a support tile whose image is bad still counts for its class: no follow-on "too few support tiles"
    assert "class 10 has only" not in text


def test_listing_stops_at_the_limit(dataset):
    for path in (dataset / "trainset/labels").glob("*.tif"):
        rewrite_raster(path, lambda d: np.full_like(d, 42))
    with pytest.raises(DatasetErrors) as info:
        validate_dataset(spec_of(dataset), max_listed=2)
    assert len(info.value.problems) == 4
    assert "4 problems" in str(info.value) and "first 2 listed" in str(info.value)
    assert sum("42" in line for line in str(info.value).splitlines()) == 2


def test_verdict_follows_the_config_not_only_the_files(dataset, tmp_path):
    cache = tmp_path / "cache.json"
    validate_dataset(spec_of(dataset), cache_path=cache)
    with pytest.raises(DatasetErrors, match="class 8 has only 2 support tiles .*; 3 needed"):
        validate_dataset(spec_of(dataset, shots=3), cache_path=cache)


def test_facts_are_cached_by_size_and_mtime(dataset, tmp_path):
    cache = tmp_path / "cache.json"
    first = validate_dataset(spec_of(dataset), cache_path=cache)
    assert first["files_read"] > 0 and first["files_cached"] == 0
    again = validate_dataset(spec_of(dataset), cache_path=cache)
    assert again["files_read"] == 0 and again["files_cached"] == first["files_read"]
    # a changed file is read again, and its new problem is found despite the cache
    name, phrase = truncated_query(dataset)
    with pytest.raises(DatasetErrors, match=phrase) as info:
        validate_dataset(spec_of(dataset), cache_path=cache)
    assert name in str(info.value)
    # same size and contents but a new mtime: read again, still bad
    path = dataset / "testset/images" / name
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(DatasetErrors, match=phrase):
        validate_dataset(spec_of(dataset), cache_path=cache)


def test_a_corrupt_cache_is_rebuilt(dataset, tmp_path):
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    assert validate_dataset(spec_of(dataset), cache_path=cache)["files_cached"] == 0
    assert validate_dataset(spec_of(dataset), cache_path=cache)["files_read"] == 0


def test_split_lists_are_checked(dataset):
    queries = [p.stem for p in query_images(dataset)]
    lists = {"support": {"8": ["no_such_tile"]}, "query": queries}
    with pytest.raises(DatasetErrors, match="no_such_tile.*no image with this stem"):
        validate_dataset(spec_of(dataset, split_lists=lists))


# ---------------------------------------------------------------------------------------------------------------
# YAML 1.1 numbers


def test_yaml_11_numbers_are_read_as_numbers():
    config = load_yaml(ROOT / "config.yaml")
    config["base_training"]["lr"] = "1e-3"
    config["base_training"]["min_lr"] = "+1E-8"
    config["base_training"]["steps"] = "3e2"
    config["base_training"]["blur_sigma"] = ["1e-1", "1"]
    checked = check_config(config, check_paths=False)
    assert checked["base_training"]["lr"] == 0.001 and isinstance(checked["base_training"]["lr"], float)
    assert checked["base_training"]["min_lr"] == 1e-8
    assert checked["base_training"]["steps"] == 300 and isinstance(checked["base_training"]["steps"], int)
    assert checked["base_training"]["blur_sigma"] == [0.1, 1.0]


def test_strings_stay_strings_where_the_schema_wants_text():
    config = load_yaml(ROOT / "config.yaml")
    config["classes"]["names"][9] = "1e3"
    assert check_config(config, check_paths=False)["classes"]["names"][9] == "1e3"


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("lr", "1e-3x", "write a plain number without quotes"),
        ("steps", "2.5", "write a whole number without quotes"),
    ],
)
def test_what_is_not_a_number_is_refused_with_the_fix(key, value, fix):
    config = load_yaml(ROOT / "config.yaml")
    config["base_training"][key] = value
    with pytest.raises(ConfigError, match=f"base_training/{key}.*{fix}"):
        check_config(config, check_paths=False)


def test_yes_no_as_text_gets_the_quoting_hint():
    config = copy.deepcopy(load_yaml(ROOT / "config.yaml"))
    config["classes"]["names"][9] = False  # `9: no` in YAML 1.1
    with pytest.raises(ConfigError, match="put the text in quotes"):
        check_config(config, check_paths=False)


@pytest.mark.workflow
def test_workflow_reads_1e_3_from_a_config_file(tmp_path):
    config = modified(load_test_config(), {"base_training.lr": 0.00123})
    configfile = write_config(tmp_path / "config.yaml", config)
    configfile.write_text(configfile.read_text().replace("lr: 0.00123", "lr: 1e-3"))
    assert "lr: 1e-3\n" in configfile.read_text()
    r = snakemake(tmp_path, "-n", "--cores", "1", configfile=configfile)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Through the workflow: no heavy job starts before the whole dataset is known good


@pytest.mark.workflow
@pytest.mark.parametrize("breaker", QUERY_SIDE, ids=[c.__name__ for c in QUERY_SIDE])
def test_bad_test_tile_stops_the_run_before_any_training(breaker, dataset, tmp_path):
    name, phrase = breaker(dataset)
    config = modified(load_test_config(), {"dataset.source": "folder", "dataset.root": str(dataset)})
    configfile = write_config(tmp_path / "config.yaml", config)
    r = snakemake(tmp_path, "--cores", "2", configfile=configfile)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("fewseg error:")]
    assert any(name in line and phrase in line for line in errors), out[-3000:]
    results = tmp_path / "results"
    started = sorted(p.stem for p in (results / "logs").glob("*.log"))
    assert started == ["validate_dataset"], started
    assert not (results / "validation" / "dataset.json").exists()
    assert not [p for p in results.rglob("*") if ".part" in p.name]


@pytest.mark.workflow
def test_a_recheck_of_the_data_reruns_no_training(local_run, tmp_path):
    """A change of shots reruns the check, and no conversion or training: its output is ancient() input."""
    changed = modified(local_run.config, {"dataset.shots": 1})
    r = snakemake(local_run.workdir, "-n", "--cores", "1", configfile=write_config(tmp_path / "c.yaml", changed))
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = job_counts(r.stdout + r.stderr)
    assert "validate_dataset" in jobs
    assert not {"convert_train_masks", "train_base", "make_demo_dataset"} & set(jobs), jobs
