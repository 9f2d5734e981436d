"""The built-in demo dataset: challenge layout, label rules, georeferencing, determinism, atomic writes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio

from fewseg.demo import DEMO_CLASSES, make_demo_dataset
from fewseg.io import read_image, read_label

SMALL = {"n_train": 3, "n_support_per_class": 2, "n_query": 4, "size": 96}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    manifest = make_demo_dataset(root, seed=1, **SMALL)
    return root, manifest


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _support_stems(manifest) -> dict[str, int]:
    return {stem: int(c) for c, stems in manifest["support"].items() for stem in stems}


def test_layout_and_counts(demo):
    root, m = demo
    assert sorted(p.name for p in root.iterdir()) == [
        "manifest.json",
        "testset",
        "testset_query_labels",
        "trainset",
    ]
    assert json.loads((root / "manifest.json").read_text()) == m
    assert m["counts"] == {"train": 3, "support": 8, "support_per_class": 2, "query": 4}
    assert m["size"] == 96 and m["seed"] == 1
    assert m["classes"] == {str(k): v for k, v in DEMO_CLASSES.items()}
    assert sorted(DEMO_CLASSES) == list(range(12))

    train = sorted(p.stem for p in (root / "trainset" / "images").glob("*.tif"))
    assert train == sorted(m["train"]) and len(train) == 3
    assert sorted(p.stem for p in (root / "trainset" / "labels").glob("*.tif")) == train

    support = _support_stems(m)
    assert sorted(m["support"]) == ["10", "11", "8", "9"]
    assert all(len(stems) == 2 for stems in m["support"].values())
    test_images = sorted(p.stem for p in (root / "testset" / "images").glob("*.tif"))
    assert test_images == sorted([*support, *m["query"]])
    assert sorted(p.stem for p in (root / "testset" / "labels").glob("*.tif")) == sorted(support)
    assert sorted(p.stem for p in (root / "testset_query_labels").glob("*.tif")) == sorted(m["query"])
    assert not set(support) & set(m["query"])


def test_stems_look_like_oem_and_train_test_are_disjoint(demo):
    _, m = demo
    train = set(m["train"])
    test = set(_support_stems(m)) | set(m["query"])
    assert not train & test
    pattern = re.compile(r"^[a-z]+_\d+$")
    assert all(pattern.match(s) for s in train | test)
    assert {s.rsplit("_", 1)[0] for s in train}.isdisjoint({s.rsplit("_", 1)[0] for s in test})


def test_geotiffs_are_georeferenced_uint8(demo):
    root, _ = demo
    origins = set()
    for image in sorted(root.rglob("images/*.tif")):
        with rasterio.open(image) as src:
            assert (src.count, src.height, src.width) == (3, 96, 96)
            assert set(src.dtypes) == {"uint8"}
            assert src.crs.to_epsg() == 32630
            assert (src.transform.a, src.transform.e) == (0.5, -0.5)
            origins.add((src.transform.c, src.transform.f))
            georef = (src.crs, src.transform)
        label = image.parent.parent / "labels" / image.name
        if not label.exists():
            label = root / "testset_query_labels" / image.name
        with rasterio.open(label) as src:
            assert (src.count, src.height, src.width) == (1, 96, 96)
            assert set(src.dtypes) == {"uint8"}
            assert (src.crs, src.transform) == georef
    assert len(origins) == 3 + 8 + 4  # every tile has its own place on the ground

    img = read_image(next(root.glob("trainset/images/*.tif")))
    assert img.std() > 10  # a scene, not a flat colour


def test_train_labels_hold_base_classes_only(demo):
    root, m = demo
    seen = set()
    for stem in m["train"]:
        lab = read_label(root / "trainset" / "labels" / f"{stem}.tif")
        assert lab.max() <= 7
        seen |= set(np.unique(lab).tolist())
    assert seen >= {1, 2, 3, 4, 5, 6, 7}


def test_train_images_show_novel_objects_labelled_background(demo):
    # As in the challenge: the imagery shows every class, the labels only base ones, the rest is 0.
    _, m = demo
    hidden = m["train_unlabelled_novel"]
    assert sum(hidden["tiles_with_class"].values()) >= 2
    assert sum(hidden["class_fractions"].values()) > 0.005
    assert m["class_fractions"]["train"]["0"] >= sum(hidden["class_fractions"].values())


def test_support_labels_hold_exactly_one_novel_class(demo):
    root, m = demo
    for stem, cls in _support_stems(m).items():
        lab = read_label(root / "testset" / "labels" / f"{stem}.tif")
        assert set(np.unique(lab).tolist()) == {0, cls}
        assert (lab == cls).mean() >= 0.01, f"{stem}: too little of class {cls}"


def test_support_images_show_other_novel_classes_unlabelled(demo, tmp_path):
    root, m = demo
    shown = m["support_unlabelled_novel"]["tiles_with_class"]
    assert sorted(shown) == ["10", "11", "8", "9"] and sum(shown.values()) >= 2  # 8 tiles, 3 others each at 0.6
    plain = make_demo_dataset(tmp_path / "plain", seed=1, support_distractors=False, **SMALL)
    assert plain["support_unlabelled_novel"]["tiles_with_class"] == {"8": 0, "9": 0, "10": 0, "11": 0}
    assert plain["query"] == m["query"] and plain["support"] == m["support"]
    images = "testset/images/{}.tif"
    for stem in m["query"]:  # only the support tiles change: train and query tiles keep their own streams
        assert np.array_equal(
            read_image(root / images.format(stem)), read_image(tmp_path / "plain" / images.format(stem))
        )
    assert not all(
        np.array_equal(read_image(root / images.format(s)), read_image(tmp_path / "plain" / images.format(s)))
        for s in _support_stems(m)
    )


def test_query_labels(demo):
    root, m = demo
    labels = {s: read_label(root / "testset_query_labels" / f"{s}.tif") for s in m["query"]}
    assert all(lab.max() <= 11 for lab in labels.values())
    assert not any((root / "testset" / "labels" / f"{s}.tif").exists() for s in m["query"])
    for cls in (8, 9, 10, 11):
        shown = sum(bool((lab == cls).any()) for lab in labels.values())
        assert shown >= len(labels) / 2, f"class {cls} in only {shown} queries"
    for lab in labels.values():
        if (lab == 8).any():
            assert (lab == 5).any(), "vehicles need a road"
    present = set().union(*(np.unique(lab).tolist() for lab in labels.values()))
    assert present >= set(range(1, 8))
    assert m["query_novel_classes"] == {s: [c for c in (8, 9, 10, 11) if (lab == c).any()] for s, lab in labels.items()}


def test_manifest_fractions(demo):
    _, m = demo
    train = m["class_fractions"]["train"]
    assert abs(sum(train.values()) - 1) < 1e-3
    assert all(train[str(c)] == 0 for c in (8, 9, 10, 11))
    assert all(train[str(c)] > 0.01 for c in range(1, 8))
    assert all(m["class_fractions"]["support"][c] >= 0.01 for c in ("8", "9", "10", "11"))
    assert m["tiles_with_class"]["support"] == {"8": 2, "9": 2, "10": 2, "11": 2}


def test_deterministic_per_seed(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=5, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=5, **SMALL)
    c = make_demo_dataset(tmp_path / "c", seed=6, **SMALL)
    assert a == b and c != a and c["seed"] == 6
    assert _tree_hashes(tmp_path / "a") == _tree_hashes(tmp_path / "b")
    ha, hc = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "c")
    shared = set(ha) & set(hc)
    assert all(ha[k] != hc[k] for k in shared if k.endswith(".tif"))


def test_replaces_old_dataset_atomically(tmp_path):
    root = tmp_path / "demo"
    make_demo_dataset(root, seed=0, n_train=1, n_support_per_class=1, n_query=1, size=64)
    (root / "stray.txt").write_text("left from an old run")
    m = make_demo_dataset(root, seed=0, n_train=2, n_support_per_class=1, n_query=1, size=64)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folders left beside it
    assert not (root / "stray.txt").exists()
    assert len(list((root / "trainset" / "images").glob("*.tif"))) == 2 == m["counts"]["train"]
    assert not list(root.rglob(".*"))  # no hidden partial files inside


def test_subset_of_novel_classes(tmp_path):
    m = make_demo_dataset(tmp_path / "d", novel_ids=(9, 11), n_train=1, n_support_per_class=1, n_query=2, size=96)
    assert sorted(m["support"]) == ["11", "9"] and m["novel_ids"] == [9, 11]
    for stem in m["query"]:
        lab = read_label(tmp_path / "d" / "testset_query_labels" / f"{stem}.tif")
        assert not np.isin(lab, [8, 10]).any()


@pytest.mark.parametrize(
    "kwargs",
    [{"novel_ids": (7,)}, {"novel_ids": ()}, {"novel_ids": (8, 8)}, {"size": 32}, {"n_train": 0}],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
