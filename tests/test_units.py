"""Unit tests of fewseg's small parts, on hand-made arrays with known answers."""

import zipfile

import numpy as np
import pytest
import torch

from fewseg.checkpoints import load_prompt, save_prompt
from fewseg.data import LazyPermutation, num_pairs, pair_at, query_half_patches, random_patches
from fewseg.io import InputError, write_png
from fewseg.metrics import ConfusionMatrix, summarize
from fewseg.overlay import background_share, filter_decision, paste_class, resolve_background_check
from fewseg.palette import (
    as_palette,
    decode_canvas,
    ids_to_rgb,
    normalize,
    random_palette,
    rgb_to_ids,
    unnormalize,
)
from fewseg.prompt import crop_windows
from fewseg.schedule import lr_at
from fewseg.submission import read_submission, write_submission

OEM_PALETTE = as_palette(
    [[0, 0, 0], [255, 0, 0], [0, 255, 255], [0, 255, 0], [255, 255, 0], [0, 0, 255], [255, 255, 255], [255, 0, 255]]
)


# --- palette ---------------------------------------------------------------------------------------------------


def test_palette_round_trip_is_exact():
    ids = np.random.default_rng(0).integers(0, 8, size=(17, 23)).astype(np.uint8)
    assert np.array_equal(rgb_to_ids(ids_to_rgb(ids, OEM_PALETTE), OEM_PALETTE), ids)


def test_palette_decodes_to_nearest_colour():
    rgb = np.array([[[250, 10, 5], [10, 10, 240], [128, 128, 128]]], dtype=np.uint8)
    assert rgb_to_ids(rgb, OEM_PALETTE).tolist() == [[1, 5, 6]]  # mid-grey is a hair nearer white


def test_decode_canvas_matches_numpy_decoding():
    ids = np.random.default_rng(1).integers(0, 8, size=(2, 8, 6)).astype(np.uint8)
    rgb = torch.from_numpy(OEM_PALETTE[ids]).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(decode_canvas(normalize(rgb), OEM_PALETTE), ids)


@pytest.mark.parametrize("channels_last", [False, True])
def test_decode_canvas_is_the_argmin_of_palette_distances(channels_last):
    """Noisy predictions in either memory layout decode to the nearest colour; a tie goes to the first colour."""
    palette = np.array([[0, 0, 0], [200, 40, 40], [200, 40, 40], [30, 90, 250]], dtype=np.uint8)
    pred = torch.randn(3, 3, 10, 7, generator=torch.Generator().manual_seed(2)) * 1.5
    if channels_last:
        pred = pred.contiguous(memory_format=torch.channels_last)
    rgb = (unnormalize(pred).clamp(0, 1) * 255)[:, None]
    want = ((rgb - torch.from_numpy(palette).float()[None, :, :, None, None]) ** 2).sum(2).argmin(1)
    got = decode_canvas(pred, palette)
    assert np.array_equal(got, want.numpy()) and set(np.unique(got)) == {0, 1, 3}  # never 2, the second of a tie


def test_palette_rejects_duplicate_colours():
    with pytest.raises(ValueError, match="distinct"):
        as_palette([[0, 0, 0], [0, 0, 0]])


def test_random_palette_is_seeded_and_separated():
    a = random_palette(8, np.random.default_rng(3))
    b = random_palette(8, np.random.default_rng(3))
    assert np.array_equal(a, b)
    d = np.linalg.norm(a[:, None].astype(float) - a[None].astype(float), axis=-1)
    assert d[~np.eye(8, dtype=bool)].min() >= 48


# --- metric ----------------------------------------------------------------------------------------------------


def test_metric_sums_intersections_and_unions_over_tiles():
    cm = ConfusionMatrix(3)
    # tile 1: class 1 predicted on 2 of its 2 pixels plus 1 false positive; tile 2: class 1 missed entirely
    cm.update(np.array([[1, 1, 1, 0]]), np.array([[1, 1, 0, 0]]))
    cm.update(np.array([[0, 0]]), np.array([[1, 1]]))
    iou = cm.iou()
    assert iou[1] == pytest.approx(2 / 5)  # I = 2, U = 3 predicted + 4 true - 2
    assert np.isnan(iou[2])


def test_metric_ignores_255_and_weights_score():
    cm = ConfusionMatrix(12, ignore_index=255)
    truth = np.array([[1, 8, 255, 0]])
    pred = np.array([[1, 8, 3, 0]])
    cm.update(pred, truth)
    s = summarize(cm, base=[1, 2], novel=[8, 9], names={})
    assert s["per_class"]["3"]["predicted_pixels"] == 0  # the ignored pixel counted nowhere
    assert s["base_miou"] == pytest.approx(1.0) and s["novel_miou"] == pytest.approx(1.0)
    assert s["score"] == pytest.approx(0.4 * 1 + 0.6 * 1)


def test_background_mistakes_enlarge_other_unions():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[1, 1]]), np.array([[1, 0]]))
    assert cm.iou()[1] == pytest.approx(0.5)


# --- overlay ---------------------------------------------------------------------------------------------------


def test_paste_with_background_check_only_fills_zero():
    current = np.array([[0, 3], [0, 0]], dtype=np.uint8)
    mask = np.array([[1, 1], [0, 1]], dtype=bool)
    out = paste_class(current, mask, 9, background_check=True, skip_nodata=False)
    assert out.tolist() == [[9, 3], [0, 9]]
    out = paste_class(current, mask, 8, background_check=False, skip_nodata=False)
    assert out.tolist() == [[8, 8], [0, 8]]


def test_background_share_counts_the_class_pixels_left_at_zero():
    base = np.array([[0, 2, 0], [3, 0, 0]], dtype=np.uint8)
    support = np.array([[1, 1, 0], [1, 1, 0]], dtype=np.uint8)
    assert background_share(base, support) == (2, 4)
    with pytest.raises(ValueError, match="differ in size"):
        background_share(base, support[:, :2])


@pytest.mark.parametrize(
    ("setting", "share", "expected"),
    [(True, None, True), (False, 0.9, False), ("auto", 0.5, True), ("auto", 0.49, False), ("auto", 1.0, True)],
)
def test_auto_background_check_follows_the_measured_share(setting, share, expected):
    assert resolve_background_check(setting, share, 0.5) is expected


def test_auto_background_check_without_a_measurement_is_an_error():
    with pytest.raises(ValueError, match="needs the base model"):
        resolve_background_check("auto", None, 0.5)
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        resolve_background_check("sometimes", 0.7, 0.5)


def test_paste_skips_pure_black_pixels():
    current = np.zeros((1, 3), dtype=np.uint8)
    image = np.array([[[0, 0, 0], [0, 0, 1], [9, 9, 9]]], dtype=np.uint8)
    out = paste_class(current, np.ones((1, 3), bool), 10, image=image, background_check=False, skip_nodata=True)
    assert out.tolist() == [[0, 10, 10]]


def test_filter_and_force_lists():
    assert filter_decision(0.60, (0.65, 0.70)) == "skip"
    assert filter_decision(0.68, (0.65, 0.70)) == "normal"
    assert filter_decision(0.75, (0.65, 0.70)) == "force"
    assert filter_decision(0.75, None) == "normal"
    current = np.array([[3, 0]], dtype=np.uint8)
    mask = np.ones((1, 2), bool)
    assert paste_class(current, mask, 9, decision="force", skip_nodata=False).tolist() == [[9, 9]]
    assert paste_class(current, mask, 9, decision="skip", skip_nodata=False).tolist() == [[3, 0]]


def test_overlay_chain_order_decides_the_winner():
    base = np.zeros((1, 2), dtype=np.uint8)
    a = np.array([[1, 1]], bool)
    b = np.array([[0, 1]], bool)
    first_a = paste_class(paste_class(base, a, 9, skip_nodata=False), b, 11, skip_nodata=False)
    first_b = paste_class(paste_class(base, b, 11, skip_nodata=False), a, 9, skip_nodata=False)
    assert first_a.tolist() == [[9, 9]] and first_b.tolist() == [[9, 11]]


# --- submission ------------------------------------------------------------------------------------------------


def test_zip_layout_is_flat_sorted_and_reproducible(tmp_path):
    preds = {}
    for stem in ("b_2", "a_1"):
        ids = np.full((5, 7), 11 if stem == "a_1" else 3, np.uint8)
        write_png(tmp_path / f"{stem}.png", ids)
        preds[stem] = tmp_path / f"{stem}.png"
    sizes = {"a_1": (5, 7), "b_2": (5, 7)}
    write_submission(tmp_path / "s1.zip", preds, sizes, max_class=11)
    write_submission(tmp_path / "s2.zip", preds, sizes, max_class=11)
    assert (tmp_path / "s1.zip").read_bytes() == (tmp_path / "s2.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "s1.zip") as zf:
        assert zf.namelist() == ["a_1.png", "b_2.png"]
    decoded = read_submission(tmp_path / "s1.zip")
    assert decoded.keys() == {"a_1", "b_2"}
    assert np.array_equal(decoded["a_1"], np.full((5, 7), 11)) and np.array_equal(decoded["b_2"], np.full((5, 7), 3))


def test_zip_refuses_wrong_size(tmp_path):
    write_png(tmp_path / "q.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="q.png"):
        write_submission(tmp_path / "s.zip", {"q": tmp_path / "q.png"}, {"q": (8, 8)}, max_class=11)
    assert not (tmp_path / "s.zip").exists()


# --- schedule --------------------------------------------------------------------------------------------------

PUBLISHED = dict(peak=1e-4, min_lr=1e-8, warmup=500, first_cycle=5000, cycle_mult=1.2, decay=0.5)


def test_schedule_published_values():
    assert lr_at(0, **PUBLISHED) == pytest.approx(1e-8)
    assert lr_at(250, **PUBLISHED) == pytest.approx(1e-8 + (1e-4 - 1e-8) / 2)
    assert lr_at(500, **PUBLISHED) == pytest.approx(1e-4)
    assert lr_at(2750, **PUBLISHED) == pytest.approx(1e-8 + (1e-4 - 1e-8) / 2)  # half-way down the cosine
    assert lr_at(5000, **PUBLISHED) == pytest.approx(1e-8)  # second cycle restarts its warm-up
    assert lr_at(5500, **PUBLISHED) == pytest.approx(0.5e-4)  # at half the peak
    # the second cycle is 500 + 4500 * 1.2 = 5900 steps long, so the third starts at 10900 with a quarter peak
    assert lr_at(10899, **PUBLISHED) < 1e-7
    assert lr_at(11400, **PUBLISHED) == pytest.approx(0.25e-4)


def test_schedule_prompt_cycles():
    kw = dict(peak=1e-3, min_lr=0.0, warmup=0, first_cycle=1000, decay=0.8)
    assert lr_at(0, **kw) == pytest.approx(1e-3)
    assert lr_at(1000, **kw) == pytest.approx(0.8e-3)
    assert lr_at(2000, **kw) == pytest.approx(0.64e-3)


# --- crops and pairs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("crop", "max_crop", "stride", "expected"),
    [(128, 128, 16, 3136), (128, 256, 32, 784 + 144), (256, 512, 64, 144 + 16)],
)
def test_crop_counts_match_the_published_ones(crop, max_crop, stride, expected):
    assert len(crop_windows(1024, crop, max_crop, stride)) == expected


def test_pair_index_covers_every_unordered_pair_once():
    for n in (2, 3, 7, 30):
        pairs = [pair_at(k, n) for k in range(num_pairs(n))]
        assert sorted(pairs) == [(i, j) for i in range(n) for j in range(i + 1, n)]


def test_lazy_permutation_is_a_bijection():
    for size in (1, 2, 10, 33153):
        perm = LazyPermutation(size, [0, 1])
        assert len({perm(k) for k in range(size)}) == size


def test_masks():
    q = query_half_patches((4, 2))
    assert q.tolist() == [False] * 4 + [True] * 4
    r = random_patches((10, 10), 0.7, np.random.default_rng(0))
    assert r.sum() == 70


# --- config files ----------------------------------------------------------------------------------------------


def test_schema_lists_exactly_the_model_presets():
    from fewseg.config import load_schema
    from fewseg.model_config import PRESETS

    schema = load_schema()["properties"]["model"]["properties"]
    assert sorted(schema["preset"]["enum"]) == sorted(PRESETS)
    assert "overrides" in schema and schema["overrides"]["description"]


def test_oem_config_passes_the_checks_over_the_defaults_and_on_its_own():
    """As ``snakemake --configfile resources/config.oem.yaml`` merges it over config.yaml, and as the bench loads it."""
    from snakemake.utils import update_config
    from workflow_utils import ROOT

    from fewseg.config import check_config, load_yaml

    oem = load_yaml(ROOT / "resources" / "config.oem.yaml")
    merged = load_yaml(ROOT / "config.yaml")
    update_config(merged, oem)
    for config in (check_config(merged, check_paths=False), check_config(oem, check_paths=False)):
        # the published settings, not the demo's
        assert config["model"]["preset"] == "vit_large" and config["runtime"]["precision"] == "bf16"
        assert config["dataset"]["shots"] == 5 and config["dataset"]["source"] == "folder"
        assert config["base_training"]["lr"] == 1e-4 and config["base_training"]["random_palette_prob"] == 1.0
        assert (config["prompt_training"]["phase1"]["lr"], config["prompt_training"]["phase2"]["lr"]) == (1e-3, 1e-5)
        assert config["prompt_training"]["classes"][11] == {"crop_size": 256, "max_crop_size": 512, "stride": 64}
        for cls in config["classes"]["novel"]:  # no demo per-class phase (class 9's, class 10's) survives the merge
            own = config["prompt_training"]["classes"][cls]
            assert own.get("phase1", config["prompt_training"]["phase1"]) == {"steps": 3000, "lr": 1e-3}
            assert own.get("phase2", config["prompt_training"]["phase2"]) == {"steps": 1000, "lr": 1e-5}
        assert config["inference"]["novel"][11] == {"grid": 2, "seam_repair": True, "flips": 1}  # no demo mirrors
        assert config["inference"]["working_size"] == 1024 and config["inference"]["novel"][8]["grid"] == 8
        assert config["overlay"]["min_prompt_iou"] == 0.0
        assert config["overlay"]["background_check"] == {8: False, 9: True, 10: True, 11: True}  # no demo "auto"
    # complete on its own (the optional pretraining section aside: real data starts from BAAI's pretrained weights)
    checked_merged, checked_oem = check_config(merged, check_paths=False), check_config(oem, check_paths=False)
    assert "pretraining" not in checked_oem
    assert {k: v for k, v in checked_merged.items() if k != "pretraining"} == checked_oem


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_fingerprint_survives_save_and_load_and_sees_one_weight(tmp_path):
    from fewseg.checkpoints import load_base_model, save_base_model
    from fewseg.model import build_model, fingerprint

    torch.manual_seed(0)
    model = build_model("micro")
    saved = save_base_model(tmp_path / "base.pt", model, {"steps": 3})
    loaded, meta = load_base_model(tmp_path / "base.pt")
    assert saved == fingerprint(model) == fingerprint(loaded) == meta["fingerprint"] and meta["steps"] == 3
    with torch.no_grad():
        loaded.decoder_pred[0].weight.view(-1)[7] += 1e-4
    changed = fingerprint(loaded)
    assert changed != saved
    assert (
        save_base_model(tmp_path / "changed.pt", loaded)
        == changed
        == load_base_model(tmp_path / "changed.pt")[1]["fingerprint"]
    )


def test_prompt_for_another_base_model_is_refused(tmp_path):
    path = tmp_path / "prompt.pt"
    save_prompt(
        path, torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), cls=9, name="parking space",
        base_fingerprint="aaaa", tile_size=(8, 8),
    )  # fmt: skip
    assert load_prompt(path, "aaaa")["cls"] == 9
    with pytest.raises(InputError, match="trained against base model aaaa"):
        load_prompt(path, "bbbb")
