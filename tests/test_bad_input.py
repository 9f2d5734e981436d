"""Bad input and bad config through the workflow itself: one clear message naming the file and the problem,
a non-zero exit, and no output left behind. (tests/test_convert.py covers every input case at the library level.)"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from workflow_utils import load_test_config, modified, rewrite_raster, snakemake, support_label_of, write_config

from fewseg.demo import make_demo_dataset

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good") / "data"
    make_demo_dataset(root, n_train=4, n_support_per_class=2, n_query=2, size=64, seed=3)
    return root


def _first(folder: Path) -> Path:
    return sorted(folder.glob("*.tif"))[0]


def drop_train_label(root):
    path = _first(root / "trainset/labels")
    path.unlink()
    return path.stem, "has no label"


def truncate_train_image(root):
    path = _first(root / "trainset/images")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name, "truncated"


def label_out_of_range(root):
    path = _first(root / "trainset/labels")
    rewrite_raster(path, lambda d: np.where(d == d.max(), 9, d).astype(np.uint8))
    return path.name, "outside the configured classes"


def two_novel_classes(root):
    path = support_label_of(root, 8)
    rewrite_raster(path, lambda d: np.concatenate([d[:, :2] * 0 + 9, d[:, 2:]], axis=1).astype(np.uint8))
    return path.name, "two novel classes"


def size_mismatch(root):
    path = _first(root / "trainset/labels")
    rewrite_raster(path, lambda d: d[:, :-4])
    return path.name, "differs from its image"


def too_few_shots(root):
    label = support_label_of(root, 9)
    label.unlink()
    (root / "testset/images" / label.name).unlink()
    return "class 9", "support tile"


def query_is_train_tile(root):
    train = _first(root / "trainset/images")
    shutil.copy(train, root / "testset/images" / train.name)
    return train.stem, "also a train tile"


def empty_train_folder(root):
    for sub in ("images", "labels"):
        for path in (root / "trainset" / sub).glob("*"):
            path.unlink()
    return "trainset/images", "no image GeoTIFFs"


CASES = [
    drop_train_label, truncate_train_image, label_out_of_range, two_novel_classes, size_mismatch, too_few_shots,
    query_is_train_tile, empty_train_folder,
]  # fmt: skip


@pytest.mark.parametrize("breaker", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_stops_before_conversion(breaker, good_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(good_dataset, root)
    name, phrase = breaker(root)
    config = modified(load_test_config(), {"dataset.source": "folder", "dataset.root": str(root)})
    configfile = write_config(tmp_path / "config.yaml", config)
    r = snakemake(tmp_path, "--cores", "1", "results/converted/split", configfile=configfile)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    error_lines = [line for line in out.splitlines() if line.startswith("fewseg error:")]
    assert any(name in line and phrase in line for line in error_lines), out[-3000:]
    converted = tmp_path / "results" / "converted"
    leftovers = sorted(p.name for p in converted.iterdir()) if converted.exists() else []
    # the stage that failed left nothing; no temporary folder survives
    assert not [n for n in leftovers if ".part" in n], leftovers
    assert "split" not in leftovers


BAD_CONFIGS = {
    "unknown_key": ({"base_training.bogus": 1}, "bogus"),
    "wrong_type": ({"base_training.steps": "many"}, "base_training/steps"),
    "overlay_unknown_class": ({"overlay.order": [9, 12]}, "overlay/order"),
    "duplicate_class_id": ({"classes.base": [1, 1, 2, 3, 4, 5, 6, 7]}, "duplicate class ids"),
    "class_both_base_and_novel": ({"classes.novel": [7, 8, 9, 10, 11]}, "both base and novel"),
    "missing_weights": ({"model.weights": "/nonexistent/seggpt_vit_large.pth"}, "model/weights"),
    "missing_dataset": ({"dataset.source": "folder", "dataset.root": "/nonexistent/oem"}, "dataset/root"),
    "missing_class_settings": ({"inference.novel": {8: {"grid": 2, "seam_repair": False}}}, "inference/novel"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_stops_before_any_job(case, tmp_path):
    changes, phrase = BAD_CONFIGS[case]
    configfile = write_config(tmp_path / "config.yaml", modified(load_test_config(), changes))
    r = snakemake(tmp_path, "--cores", "1", configfile=configfile)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert phrase in out, out[-2000:]
    assert not (tmp_path / "results").exists()


def test_duplicate_yaml_key_is_refused(tmp_path):
    text = (Path(__file__).parent / "config.test.yaml").read_text() + "\nseed: 1\n"
    configfile = tmp_path / "config.yaml"
    configfile.write_text(text)
    r = snakemake(tmp_path, "--cores", "1", configfile=configfile)
    assert r.returncode != 0
    assert "duplicate key 'seed'" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()
