"""Dataset conversion: the happy paths, and one table of broken inputs that must each be refused cleanly."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from fewseg.convert import convert_train, split_support
from fewseg.io import InputError
from fewseg.palette import rgb_to_ids

PALETTE = [
    [0, 0, 0],
    [255, 0, 0],
    [0, 255, 255],
    [0, 255, 0],
    [255, 255, 0],
    [0, 0, 255],
    [255, 255, 255],
    [255, 0, 255],
]
BASE = [1, 2, 3, 4, 5, 6, 7]
NOVEL = [8, 9]
SHOTS = 2
SIZE = (16, 16)
TRAIN_STEMS = ["t0", "t1", "t2"]
SUPPORT = {"s8a": 8, "s8b": 8, "s9a": 9, "s9b": 9}
QUERIES = ["q0", "q1"]
SPLIT_LISTS = {"support": {"8": ["s8a", "s8b"], "9": ["s9a", "s9b"]}, "query": ["q0", "q1"]}


# ---------------------------------------------------------------------------------------------------------------
# Fixture builders


def write_tif(path: Path, array: np.ndarray, **profile) -> Path:
    """Write (H, W) or (B, H, W) data as a small georeferenced GeoTIFF."""
    array = np.asarray(array)
    bands = array[None] if array.ndim == 2 else array
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=bands.shape[1],
        width=bands.shape[2],
        count=bands.shape[0],
        dtype=bands.dtype.name,
        crs="EPSG:32630",
        transform=Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0),
        **profile,
    ) as dst:
        dst.write(bands)
    return path


def read_tif(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)) * 7919)


def random_image(name: str, size=SIZE) -> np.ndarray:
    return rng_for(name).integers(0, 256, (3, *size), dtype=np.uint8)


def train_label(name: str, size=SIZE) -> np.ndarray:
    label = rng_for(name + "L").integers(0, 8, size, dtype=np.uint8)
    label[0, :3] = 255  # a few ignore pixels
    return label


def support_label(cls: int, size=SIZE) -> np.ndarray:
    label = np.zeros(size, dtype=np.uint8)
    label[2:8, 3:9] = cls
    label[-1, -2:] = 255
    return label


def make_train(root: Path, size=SIZE) -> tuple[Path, Path]:
    for stem in TRAIN_STEMS:
        write_tif(root / "train" / "images" / f"{stem}.tif", random_image(stem, size), compress="deflate")
        write_tif(root / "train" / "labels" / f"{stem}.tif", train_label(stem, size))
    return root / "train" / "images", root / "train" / "labels"


def make_val(root: Path, size=SIZE) -> tuple[Path, Path]:
    for stem, cls in SUPPORT.items():
        write_tif(root / "val" / "images" / f"{stem}.tif", random_image(stem, size))
        write_tif(root / "val" / "labels" / f"{stem}.tif", support_label(cls, size))
    for stem in QUERIES:
        write_tif(root / "val" / "images" / f"{stem}.tif", random_image(stem, size))
    return root / "val" / "images", root / "val" / "labels"


def make_all(root: Path) -> None:
    make_train(root)
    make_val(root)


def run_train(root: Path, out: Path, **kw) -> dict:
    kw = {"palette": PALETTE, "base_ids": BASE, **kw}
    return convert_train(root / "train" / "images", root / "train" / "labels", out, **kw)


def run_val(root: Path, out: Path, **kw) -> dict:
    kw = {"novel_ids": NOVEL, "shots": SHOTS, **kw}
    return split_support(root / "val" / "images", root / "val" / "labels", out, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Ways to break a good dataset: each takes the data root and returns extra keyword arguments for the stage


def truncate(rel: str) -> Callable:
    def apply(root: Path) -> None:
        path = root / rel
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return apply


def random_bytes(rel: str, n: int = 2000) -> Callable:
    def apply(root: Path) -> None:
        (root / rel).write_bytes(np.random.default_rng(1).bytes(n))

    return apply


def empty_file(rel: str) -> Callable:
    def apply(root: Path) -> None:
        (root / rel).write_bytes(b"")

    return apply


def rewrite(rel: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    """Replace a GeoTIFF by fn(its (B, H, W) pixels)."""

    def apply(root: Path) -> None:
        path = root / rel
        write_tif(path, fn(read_tif(path)))

    return apply


def set_pixels(rel: str, value: int, where=(slice(4, 6), slice(0, 2))) -> Callable:
    def fn(bands: np.ndarray) -> np.ndarray:
        bands = bands.copy()
        bands[0][where] = value
        return bands

    return rewrite(rel, fn)


def remove(rel: str) -> Callable:
    def apply(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return apply


def empty_folder(rel: str, leave: str | None = None) -> Callable:
    def apply(root: Path) -> None:
        for path in (root / rel).iterdir():
            path.unlink()
        if leave:
            (root / rel / leave).write_text("not a tile\n")

    return apply


def copy(src: str, dst: str) -> Callable:
    def apply(root: Path) -> None:
        shutil.copyfile(root / src, root / dst)

    return apply


def kwargs(**kw) -> Callable:
    return lambda root: kw


def both(*fns: Callable) -> Callable:
    def apply(root: Path) -> dict:
        out: dict = {}
        for fn in fns:
            out.update(fn(root) or {})
        return out

    return apply


def same_pixels_in_train(root: Path) -> dict:
    """A train image holding a query's pixels under another name and another compression."""
    write_tif(root / "train" / "images" / "t9.tif", read_tif(root / "val" / "images" / "q1.tif"), compress="lzw")
    write_tif(root / "train" / "labels" / "t9.tif", train_label("t9"))
    return {"train_images_dir": root / "train" / "images"}


def split_lists(support=None, query=None) -> Callable:
    lists = {
        "support": support if support is not None else SPLIT_LISTS["support"],
        "query": query if query is not None else SPLIT_LISTS["query"],
    }
    return kwargs(split_lists=lists)


def case(id, stage, breaker, name, phrase):
    return pytest.param(stage, breaker, name, phrase, id=id)


TI, TL = "train/images", "train/labels"
VI, VL = "val/images", "val/labels"

CASES = [
    # --- train set ---------------------------------------------------------------------------------------------
    case("train-missing-images-folder", "train", remove(TI), TI, "folder not found"),
    case("train-missing-labels-folder", "train", remove(TL), TL, "folder not found"),
    case("train-empty-images-folder", "train", empty_folder(TI, leave="notes.txt"), TI, "no image GeoTIFFs"),
    case("train-empty-labels-folder", "train", empty_folder(TL), TL, "no label GeoTIFFs"),
    case("train-image-without-label", "train", remove(f"{TL}/t1.tif"), "t1.tif", "image has no label"),
    case("train-label-without-image", "train", remove(f"{TI}/t1.tif"), "t1.tif", "label has no image"),
    case("train-truncated-image", "train", truncate(f"{TI}/t1.tif"), "t1.tif", "truncated"),
    case("train-random-bytes-image", "train", random_bytes(f"{TI}/t1.tif"), "t1.tif", "not a readable GeoTIFF"),
    case("train-truncated-label", "train", truncate(f"{TL}/t2.tif"), "t2.tif", "truncated"),
    case("train-empty-label-file", "train", empty_file(f"{TL}/t0.tif"), "t0.tif", "not a readable GeoTIFF"),
    case(
        "train-image-4-bands",
        "train",
        rewrite(f"{TI}/t1.tif", lambda b: np.concatenate([b, b[:1]])),
        "t1.tif",
        "expected 3 bands",
    ),
    case("train-image-1-band", "train", rewrite(f"{TI}/t1.tif", lambda b: b[:1]), "t1.tif", "expected 3 bands"),
    case(
        "train-label-3-bands",
        "train",
        rewrite(f"{TL}/t1.tif", lambda b: np.repeat(b, 3, 0)),
        "t1.tif",
        "expected 1 band",
    ),
    case(
        "train-image-uint16",
        "train",
        rewrite(f"{TI}/t1.tif", lambda b: b.astype(np.uint16) * 4),
        "t1.tif",
        "expected uint8",
    ),
    case(
        "train-label-float32",
        "train",
        rewrite(f"{TL}/t1.tif", lambda b: b.astype(np.float32)),
        "t1.tif",
        "expected uint8",
    ),
    case(
        "train-size-mismatch",
        "train",
        rewrite(f"{TL}/t1.tif", lambda b: b[:, :12, :]),
        "t1.tif",
        "differs from its image",
    ),
    case(
        "train-label-novel-class",
        "train",
        set_pixels(f"{TL}/t1.tif", 8),
        "t1.tif",
        "outside the configured classes: 8 (4 px)",
    ),
    case(
        "train-label-stray-value",
        "train",
        set_pixels(f"{TL}/t2.tif", 42),
        "t2.tif",
        "outside the configured classes: 42",
    ),
    case(
        "train-ignore-not-configured",
        "train",
        kwargs(ignore_index=None),
        "t0.tif",
        "outside the configured classes: 255",
    ),
    case("train-duplicate-stem", "train", copy(f"{TI}/t1.tif", f"{TI}/t1.tiff"), "t1.tiff", "duplicate stem"),
    case(
        "train-duplicate-stem-case",
        "train",
        both(copy(f"{TI}/t1.tif", f"{TI}/T1.tif"), copy(f"{TL}/t1.tif", f"{TL}/T1.tif")),
        "t1.tif",
        "only in letter case",
    ),
    case(
        "train-first-sorted-problem-reported",
        "train",
        both(truncate(f"{TI}/t2.tif"), set_pixels(f"{TL}/t1.tif", 99)),
        "t1.tif",
        "outside the configured classes: 99",
    ),
    # --- validation / test set ---------------------------------------------------------------------------------
    case("val-missing-images-folder", "val", remove(VI), VI, "folder not found"),
    case("val-empty-labels-folder", "val", empty_folder(VL), VL, "no label GeoTIFFs"),
    case("val-label-without-image", "val", remove(f"{VI}/s8b.tif"), "s8b.tif", "label has no image"),
    case("val-truncated-support-image", "val", truncate(f"{VI}/s9a.tif"), "s9a.tif", "truncated"),
    case("val-truncated-support-label", "val", truncate(f"{VL}/s8a.tif"), "s8a.tif", "truncated"),
    case("val-truncated-query-image", "val", truncate(f"{VI}/q1.tif"), "q1.tif", "truncated"),
    case("val-random-bytes-query", "val", random_bytes(f"{VI}/q0.tif"), "q0.tif", "not a readable GeoTIFF"),
    case(
        "val-query-4-bands",
        "val",
        rewrite(f"{VI}/q0.tif", lambda b: np.concatenate([b, b[:1]])),
        "q0.tif",
        "expected 3 bands",
    ),
    case(
        "val-support-label-uint16",
        "val",
        rewrite(f"{VL}/s9b.tif", lambda b: b.astype(np.uint16)),
        "s9b.tif",
        "expected uint8",
    ),
    case(
        "val-support-size-mismatch",
        "val",
        rewrite(f"{VI}/s9b.tif", lambda b: b[:, :, :10]),
        "s9b.tif",
        "differs from its image",
    ),
    case(
        "val-support-base-class",
        "val",
        set_pixels(f"{VL}/s8a.tif", 3),
        "s8a.tif",
        "outside the configured classes: 3 (4 px)",
    ),
    case(
        "val-support-no-novel-pixel",
        "val",
        rewrite(f"{VL}/s9a.tif", lambda b: np.where(b == 9, 0, b).astype(np.uint8)),
        "s9a.tif",
        "no novel-class pixel",
    ),
    case(
        "val-support-two-novel-classes",
        "val",
        set_pixels(f"{VL}/s8b.tif", 9, where=(slice(12, 14), slice(12, 14))),
        "s8b.tif",
        "two novel classes, 8 (36 px), 9 (4 px)",
    ),
    case(
        "val-class-without-support",
        "val",
        both(remove(f"{VL}/s9a.tif"), remove(f"{VL}/s9b.tif")),
        VL,
        "novel class 9 has no support tile",
    ),
    case(
        "val-fewer-than-shots",
        "val",
        remove(f"{VL}/s9b.tif"),
        VL,
        "novel class 9 has only 1 support tile",
    ),
    case(
        "val-no-query",
        "val",
        both(copy(f"{VL}/s8a.tif", f"{VL}/q0.tif"), copy(f"{VL}/s8a.tif", f"{VL}/q1.tif")),
        VI,
        "no query tiles",
    ),
    case("val-query-train-stem", "val", kwargs(train_stems=["t0", "q1"]), "q1.tif", "also a train tile"),
    case("val-query-train-pixels", "val", same_pixels_in_train, "q1.tif", "same pixels as train tile"),
    case(
        "val-train-images-truncated",
        "val",
        both(truncate(f"{TI}/t1.tif"), lambda root: {"train_images_dir": root / TI}),
        "t1.tif",
        "truncated",
    ),
    case("val-duplicate-stem", "val", copy(f"{VI}/q0.tif", f"{VI}/q0.tiff"), "q0.tiff", "duplicate stem"),
    case(
        "val-split-support-missing-stem",
        "val",
        split_lists(support={"8": ["s8a", "s8b"], "9": ["s9a", "ghost"]}),
        "ghost.tif",
        "no image with this stem exists",
    ),
    case(
        "val-split-query-missing-stem",
        "val",
        split_lists(query=["q0", "nowhere.tif"]),
        "nowhere.tif",
        "no image with this stem exists",
    ),
    case(
        "val-split-support-other-class",
        "val",
        split_lists(support={"8": ["s8a", "s9a"], "9": ["s8b", "s9b"]}),
        "s8b.tif",
        "its label holds class 8",
    ),
    case(
        "val-split-support-without-label",
        "val",
        split_lists(support={"8": ["s8a", "s8b", "q0"], "9": ["s9a", "s9b"]}, query=["q1"]),
        "q0.tif",
        "has no label",
    ),
    case(
        "val-split-stem-twice",
        "val",
        split_lists(query=["q0", "q1", "s8a"]),
        "s8a.tif",
        "both as a query tile and as a support tile",
    ),
    case(
        "val-split-not-novel",
        "val",
        split_lists(support={"8": ["s8a", "s8b"], "9": ["s9a", "s9b"], "3": ["q0"]}, query=["q1"]),
        VI,
        "support class 3 is not a novel class",
    ),
    case(
        "val-split-fewer-than-shots",
        "val",
        split_lists(support={"8": ["s8a", "s8b"], "9": ["s9a"]}),
        VL,
        "novel class 9 has only 1 support tile in the split lists",
    ),
]


@pytest.mark.parametrize(("stage", "breaker", "name", "phrase"), CASES)
def test_bad_input_is_refused(tmp_path, stage, breaker, name, phrase):
    root = tmp_path / "data"
    make_all(root)
    extra = breaker(root) or {}
    out = tmp_path / "out" / stage
    with pytest.raises(InputError) as info:
        (run_train if stage == "train" else run_val)(root, out, **extra)
    message = str(info.value)
    assert name in message, message
    assert phrase in message, message
    assert info.value.path is not None
    assert not out.exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == [], leftovers


def test_failed_rerun_keeps_previous_output(tmp_path):
    make_all(tmp_path)
    out = tmp_path / "out"
    first = run_train(tmp_path, out)
    truncate(f"{TI}/t0.tif")(tmp_path)
    with pytest.raises(InputError, match="truncated"):
        run_train(tmp_path, out)
    assert json.loads((out / "index.json").read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train", "val"]


def test_output_folder_may_not_replace_an_input(tmp_path):
    make_all(tmp_path)
    with pytest.raises(InputError, match="would replace the input folder"):
        run_train(tmp_path, tmp_path / "train")
    with pytest.raises(InputError, match="would replace the input folder"):
        run_val(tmp_path, tmp_path / "val" / "images")
    assert sorted(p.name for p in (tmp_path / "train" / "images").iterdir()) == [f"{s}.tif" for s in TRAIN_STEMS]


# ---------------------------------------------------------------------------------------------------------------
# Happy paths


def test_convert_train_paints_masks_that_round_trip(tmp_path):
    images, labels = make_train(tmp_path)
    out = tmp_path / "out"
    index = run_train(tmp_path, out)
    assert json.loads((out / "index.json").read_text()) == index
    assert index["palette"] == PALETTE
    assert [t["stem"] for t in index["tiles"]] == TRAIN_STEMS
    palette = np.array(PALETTE, dtype=np.uint8)
    for tile in index["tiles"]:
        stem = tile["stem"]
        assert tile["image"] == os.path.abspath(images / f"{stem}.tif")
        assert Path(tile["image"]).is_absolute()
        assert tile["mask"] == f"masks/{stem}.png"
        label = read_tif(labels / f"{stem}.tif")[0]
        mask = np.asarray(Image.open(out / tile["mask"]))
        assert mask.shape == (*SIZE, 3)
        expected = np.where(label == 255, 0, label)
        np.testing.assert_array_equal(rgb_to_ids(mask, palette), expected)
        assert (mask[label == 255] == 0).all()  # ignore painted black
        assert (tile["height"], tile["width"]) == SIZE
        values, counts = np.unique(label, return_counts=True)
        assert tile["pixels"] == {str(v): int(c) for v, c in zip(values, counts, strict=True)}
        assert tile["pixels"]["255"] == 3
        assert tile["classes"] == [int(v) for v in values if v != 255]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{s}.png" for s in TRAIN_STEMS]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "masks"]


def test_convert_train_custom_ignore_index(tmp_path):
    make_train(tmp_path)
    for stem in TRAIN_STEMS:
        rewrite(f"{TL}/{stem}.tif", lambda b: np.where(b == 255, 250, b).astype(np.uint8))(tmp_path)
    index = run_train(tmp_path, tmp_path / "out", ignore_index=250)
    for tile in index["tiles"]:
        assert tile["pixels"]["250"] == 3 and "255" not in tile["pixels"]
        assert 250 not in tile["classes"]
        mask = np.asarray(Image.open(tmp_path / "out" / tile["mask"]))
        assert (mask[0, :3] == 0).all()
    with pytest.raises(InputError, match=r"t0\.tif.*outside the configured classes: 250"):
        run_train(tmp_path, tmp_path / "out2")


def test_base_classes_need_palette_colours(tmp_path):
    make_train(tmp_path)
    with pytest.raises(ValueError, match="no colour"):
        run_train(tmp_path, tmp_path / "out", base_ids=[*BASE, 8])
    with pytest.raises(ValueError, match="ignore_index"):
        run_train(tmp_path, tmp_path / "out", ignore_index=7)
    assert not (tmp_path / "out").exists()


def test_rerun_replaces_existing_output(tmp_path):
    make_all(tmp_path)
    for out, run in ((tmp_path / "train_out", run_train), (tmp_path / "val_out", run_val)):
        out.mkdir()
        (out / "stale.txt").write_text("from an earlier run\n")
        run(tmp_path, out)
        assert not (out / "stale.txt").exists()
        run(tmp_path, out)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_split_support_layout(tmp_path):
    images, _ = make_val(tmp_path)
    make_train(tmp_path)
    # a .tiff source still lands as <stem>.tif
    (images / "s9b.tif").rename(images / "s9b.tiff")
    out = tmp_path / "support"
    result = run_val(tmp_path, out, train_stems=TRAIN_STEMS, train_images_dir=tmp_path / TI)
    assert result["support"] == {"8": ["s8a", "s8b"], "9": ["s9a", "s9b"]}
    assert json.loads((out / "support.json").read_text()) == result["support"]
    assert json.loads((out / "query.json").read_text()) == {"queries": result["queries"]}
    assert result["queries"] == [
        {"stem": s, "image": os.path.abspath(images / f"{s}.tif"), "height": SIZE[0], "width": SIZE[1]} for s in QUERIES
    ]
    for stem, cls in SUPPORT.items():
        src = images / (f"{stem}.tiff" if stem == "s9b" else f"{stem}.tif")
        copied = out / str(cls) / "images" / f"{stem}.tif"
        assert copied.read_bytes() == src.read_bytes()
        mask = np.asarray(Image.open(out / str(cls) / "labels" / f"{stem}.png"))
        # 1 exactly on the class's pixels (support_label draws them at [2:8, 3:9]); 0 on background and ignore
        expected = np.zeros(SIZE, np.uint8)
        expected[2:8, 3:9] = 1
        np.testing.assert_array_equal(mask, expected)
    assert sorted(p.name for p in out.iterdir()) == ["8", "9", "query.json", "support.json"]


def test_split_lists_are_honoured(tmp_path):
    images, labels = make_val(tmp_path)
    # a third labelled tile of class 8 that the lists leave out, and a query the lists leave out
    write_tif(images / "s8c.tif", random_image("s8c"))
    write_tif(labels / "s8c.tif", support_label(8))
    lists = {"support": {8: ["s8b.tif", "s8a"], "9": ["images/s9a.tif", "s9b"]}, "query": ["q1.tif"]}
    out = tmp_path / "support"
    result = run_val(tmp_path, out, split_lists=lists)
    assert result["support"] == {"8": ["s8a", "s8b"], "9": ["s9a", "s9b"]}
    assert [q["stem"] for q in result["queries"]] == ["q1"]
    assert not (out / "8" / "images" / "s8c.tif").exists()
    # without the lists, s8c is a support tile too
    inferred = run_val(tmp_path, tmp_path / "inferred")
    assert inferred["support"]["8"] == ["s8a", "s8b", "s8c"]
    assert [q["stem"] for q in inferred["queries"]] == QUERIES


def test_odd_non_square_size(tmp_path):
    size = (20, 30)
    make_train(tmp_path, size=size)
    make_val(tmp_path, size=size)
    index = run_train(tmp_path, tmp_path / "train_out")
    assert all((t["height"], t["width"]) == size for t in index["tiles"])
    mask = np.asarray(Image.open(tmp_path / "train_out" / "masks" / "t0.png"))
    assert mask.shape == (*size, 3)
    result = run_val(tmp_path, tmp_path / "val_out")
    assert all((q["height"], q["width"]) == size for q in result["queries"])
    assert np.asarray(Image.open(tmp_path / "val_out" / "9" / "labels" / "s9a.png")).shape == size
