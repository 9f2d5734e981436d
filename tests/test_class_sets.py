"""A config with another set of classes, given with --configfile over config.yaml, runs as written."""

import copy
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from snakemake.utils import update_config
from workflow_utils import load_test_config, snakemake, write_config

from fewseg.config import ConfigError, check_config, drop_default_classes, load_yaml
from fewseg.demo import make_demo_dataset

ROOT = Path(__file__).resolve().parent.parent


def one_novel_class(config: dict, cls: int = 9, name: str = "solar panel") -> dict:
    """``config`` cut down to the base classes and one novel class, as a user would write it."""
    config = copy.deepcopy(config)
    config["classes"]["novel"] = [cls]
    config["classes"]["names"] = {k: v for k, v in config["classes"]["names"].items() if int(k) <= 7} | {cls: name}
    config["mapping"]["novel_filter"]["thresholds"] = {cls: [0.6, 0.7]}
    config["prompt_training"]["classes"] = {cls: config["prompt_training"]["classes"][cls]}
    config["inference"]["novel"] = {cls: config["inference"]["novel"][cls]}
    config["overlay"]["background_check"] = {cls: True}
    config["overlay"]["order"] = [cls]
    return config


def layered(user: dict) -> tuple[dict, dict]:
    """What Snakemake hands the Snakefile: config.yaml with the user's file laid over it, and the user's part."""
    merged = load_yaml(ROOT / "config.yaml")
    update_config(merged, copy.deepcopy(user))
    return merged, user


def test_plain_merge_keeps_the_default_classes_and_is_refused():
    merged, _ = layered(one_novel_class(load_yaml(ROOT / "config.yaml")))
    with pytest.raises(ConfigError, match="neither base nor novel"):
        check_config(merged, check_paths=False)


def test_default_entries_of_other_classes_are_dropped():
    merged, user = layered(one_novel_class(load_yaml(ROOT / "config.yaml")))
    checked = check_config(drop_default_classes(merged, user), check_paths=False)
    assert checked["classes"]["novel"] == [9]
    assert sorted(checked["classes"]["names"]) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert checked["classes"]["names"][9] == "solar panel"
    for section, key in (("prompt_training", "classes"), ("inference", "novel"), ("overlay", "background_check")):
        assert sorted(checked[section][key]) == [9]


def test_a_partial_file_still_merges_one_class_over_the_defaults():
    user = {"inference": {"novel": {8: {"grid": 8}}}}
    merged, _ = layered(user)
    checked = check_config(drop_default_classes(merged, user), check_paths=False)
    assert checked["inference"]["novel"][8] == {"grid": 8, "seam_repair": False, "flips": 4}
    assert sorted(checked["inference"]["novel"]) == [8, 9, 10, 11]


def test_a_class_the_user_writes_but_does_not_configure_is_still_reported():
    user = one_novel_class(load_yaml(ROOT / "config.yaml"))
    user["inference"]["novel"][12] = {"grid": 2, "seam_repair": False}  # a typo, or a class left out of classes
    merged, _ = layered(user)
    with pytest.raises(ConfigError, match=r"inference/novel: \[12\] are not novel classes"):
        check_config(drop_default_classes(merged, user), check_paths=False)


def test_no_overrides_leave_config_yaml_as_it_is():
    config = load_yaml(ROOT / "config.yaml")
    assert drop_default_classes(config, {}) == config


@pytest.mark.workflow
def test_one_novel_class_on_512px_geotiffs_through_configfile(tmp_path):
    root = tmp_path / "data"
    make_demo_dataset(root, n_train=4, n_support_per_class=2, n_query=2, size=512, seed=5, novel_ids=[9])
    user = one_novel_class(load_test_config())
    user["dataset"] |= {"source": "folder", "root": str(root)}
    configfile = write_config(tmp_path / "my-config.yaml", user)
    # config.yaml's defaults (classes 8-11) stay in place; only --configfile is given, as a user would
    r = snakemake(tmp_path, "--cores", "2", configfile=configfile)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (tmp_path / "results/prompts/8").exists()
    assert sorted(p.name for p in (tmp_path / "results/prompts").iterdir()) == ["9"]
    with zipfile.ZipFile(tmp_path / "results/submission.zip") as zf:
        names = sorted(zf.namelist())
        assert len(names) == 2
        for name in names:
            ids = np.asarray(Image.open(io.BytesIO(zf.read(name))))
            assert ids.shape == (512, 512)
            assert set(np.unique(ids)) <= {0, 1, 2, 3, 4, 5, 6, 7, 9}
    metrics = json.loads((tmp_path / "results/metrics.json").read_text())
    assert metrics["per_class"]["9"]["name"] == "solar panel"
    assert metrics["per_class"].get("8", {}).get("iou") is None  # an id below 9, but no class of this run
