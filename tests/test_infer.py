"""Inference geometry on arrays with known answers, and inference on a non-square 1000x1000-style input."""

import numpy as np
import pytest
import torch

from fewseg.data import resize_image, resize_nearest
from fewseg.infer import (
    BasePrompt,
    Prompts,
    band_mask,
    boxes_touching,
    canvas_mask,
    flip_dims,
    predict_base,
    predict_ensembled,
    predict_novel,
    predict_novel_many,
    prompt_pairs,
    seam_crops,
    tile_boxes,
)
from fewseg.model import build_model
from fewseg.palette import BINARY_PALETTE, to_tensor


def test_tile_boxes_cover_the_map_once():
    for size, grid in ((1024, 2), (1024, 8), (1000, 3), (96, 4)):
        cover = np.zeros((size, size), int)
        for y0, x0, y1, x1 in tile_boxes(size, grid):
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()
        assert len(tile_boxes(size, grid)) == grid * grid


def test_published_five_seam_crops_on_a_2x2_tiling():
    crops = seam_crops(1024, 2, patches=28, band=4)
    boxes = sorted(c.box for c in crops)
    assert boxes == sorted(
        [
            (0, 256, 512, 768),  # top-middle (vertical seam)
            (512, 256, 1024, 768),  # bottom-middle
            (256, 0, 768, 512),  # left-middle (horizontal seam)
            (256, 512, 768, 1024),  # right-middle
            (256, 256, 768, 768),  # centre
        ]
    )
    centre = next(c for c in crops if c.box == (256, 256, 768, 768))
    m = band_mask(centre, 28)
    assert m.sum() == 64 and m[10:18, 10:18].all()  # an 8 x 8-patch square
    top = next(c for c in crops if c.box == (0, 256, 512, 768))
    m = band_mask(top, 28)
    assert m.sum() == 28 * 8 and m[:, 10:18].all()  # +-4 patch columns around the seam


def test_canvas_mask_never_masks_the_prompt_half():
    q = np.ones((3, 2), bool)
    m = canvas_mask(q)
    assert m.tolist() == [False] * 6 + [True] * 6


def test_ensemble_pairs_query_tile_with_every_tile_of_top_k_prompts():
    prompts = [np.zeros((1024, 1024, 3), np.uint8), np.zeros((512, 512, 3), np.uint8)]
    pairs = prompt_pairs(prompts, 2)
    assert pairs == [(0, box) for box in tile_boxes(1024, 2)] + [(1, box) for box in tile_boxes(512, 2)]
    assert sorted({p for p, _ in pairs}) == [0, 1] and len(set(pairs)) == 8


def _micro():
    torch.manual_seed(0)
    return build_model("micro").eval()


def _loud_micro():
    """A random micro model paints near-constant binary maps; a louder output layer gives maps with structure."""
    model = _micro()
    with torch.no_grad():
        model.decoder_pred[3].weight.mul_(300.0)
    return model


@pytest.mark.slow
def test_base_prediction_comes_back_at_the_query_size():
    model = _micro()
    rng = np.random.default_rng(0)
    query = rng.integers(0, 255, (1000, 1000, 3), dtype=np.uint8)  # an OEM tile's size
    prompt = BasePrompt(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), np.zeros((96, 96, 3), np.uint8))
    palette = np.array([[0, 0, 0], [255, 0, 0]], np.uint8)
    ids = predict_base(
        model, query, [prompt, prompt], palette, working_size=96, grid=2, seam_repair=True, seam_band=1,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert ids.shape == (1000, 1000) and ids.dtype == np.uint8 and ids.max() <= 1


def test_novel_prediction_comes_back_at_an_odd_query_size():
    model = _loud_micro()
    query = np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    h, w = model.config.tile_size
    prompt = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = predict_novel(
        model, query, prompt, prompt, working_size=96, grid=3, seam_repair=True, seam_band=1, batch_size=4,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert mask.shape == (70, 90)
    assert 0 < mask.sum() < mask.size  # both classes present: the map was decoded, not filled


def _random_prompt(model, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learned prompt's (image, label) pair of random values, at the model's tile size."""
    h, w = model.config.tile_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, h, w, generator=g), torch.randn(1, 3, h, w, generator=g)


def _coloured_case(model, rng: np.random.Generator, queries: int) -> tuple[Prompts, list, list]:
    """Two random prompt tiles with three-colour masks, and query tiles with random first-pass colours."""
    h, w = model.config.tile_size
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    prompts = Prompts(to_tensor(rng.integers(0, 255, (2, h, w, 3), dtype=np.uint8)),
                      to_tensor(palette[rng.integers(0, 3, (2, h, w))]), palette)  # fmt: skip
    return (
        prompts,
        list(rng.integers(0, 255, (queries, h, w, 3), dtype=np.uint8)),
        list(palette[rng.integers(0, 3, (queries, h, w))]),
    )


def _base_case(seed: int):
    rng = np.random.default_rng(seed)
    query = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    prompts = [
        BasePrompt(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), palette[rng.integers(0, 3, (96, 96))])
        for _ in range(2)
    ]
    return query, prompts, palette


@pytest.mark.slow
def test_batched_base_inference_equals_one_query_tile_per_forward():
    """Sharing forwards across a query's tiles and seam crops (grouped ensemble) changes no pixel."""
    model = _micro()
    query, prompts, palette = _base_case(2)
    kwargs = dict(working_size=96, grid=2, seam_band=1, device=torch.device("cpu"))
    for seam in (False, True):
        one = predict_base(model, query, prompts, palette, seam_repair=seam, batch_size=8, **kwargs)  # 8 pairs
        many = predict_base(model, query, prompts, palette, seam_repair=seam, batch_size=64, **kwargs)
        assert np.array_equal(one, many)
    assert len(np.unique(many)) > 1  # a prediction with structure, not a constant


def test_boxes_touching_a_region_include_every_tile_it_reaches():
    region = np.zeros((100, 100), bool)
    region[10, 10] = True  # top-left tile of a 2x2 cut
    assert boxes_touching(region, 64, 2) == [True, False, False, False]
    region[:] = False
    region[50, 80] = True  # on the seam between the right-hand tiles, as the nearest resize may read it
    assert boxes_touching(region, 64, 2) == [False, True, False, True]
    assert boxes_touching(np.zeros((100, 100), bool), 64, 2) == [False] * 4


def test_predicting_a_region_gives_the_whole_prediction_there_and_costs_its_tiles():
    model = _micro()
    query, prompts, palette = _base_case(4)
    region = np.zeros((96, 96), bool)
    region[5:20, 70:90] = True  # inside the top-right tile of a 3x3 cut
    region[70, 40] = True  # and one pixel of the bottom-middle tile
    kwargs = dict(working_size=96, grid=3, seam_band=1, device=torch.device("cpu"), batch_size=64)
    whole = predict_base(model, query, prompts, palette, seam_repair=False, **kwargs)
    part = predict_base(model, query, prompts, palette, seam_repair=False, region=region, outside=255, **kwargs)
    assert np.array_equal(part[region], whole[region])
    assert (part == 255).mean() == pytest.approx(7 / 9)  # two of the nine tiles predicted
    with pytest.raises(ValueError, match="seam repair"):
        predict_base(model, query, prompts, palette, seam_repair=True, region=region, **kwargs)


def test_seam_repair_changes_only_the_bands():
    model = _micro()
    query, prompts, palette = _base_case(3)
    kwargs = dict(working_size=96, grid=2, seam_band=1, device=torch.device("cpu"), batch_size=64)
    plain = predict_base(model, query, prompts, palette, seam_repair=False, **kwargs)
    repaired = predict_base(model, query, prompts, palette, seam_repair=True, **kwargs)
    bands = np.zeros((96, 96), bool)
    patches = model.config.tile_size[0] // model.config.patch_size
    for crop in seam_crops(96, 2, patches, 1):
        y0, x0, y1, x1 = crop.box
        side = y1 - y0
        m = band_mask(crop, patches).repeat(side // patches, 0).repeat(side // patches, 1)
        bands[y0:y1, x0:x1] |= m
    assert np.array_equal(plain[~bands], repaired[~bands])
    assert not np.array_equal(plain[bands], repaired[bands])


def test_batched_novel_inference_equals_one_tile_per_forward():
    model = _loud_micro()
    query = np.random.default_rng(4).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    p_img, p_lab = _random_prompt(model, 0)
    kwargs = dict(working_size=96, grid=3, seam_repair=True, seam_band=1, device=torch.device("cpu"))
    one = predict_novel(model, query, p_img, p_lab, batch_size=1, **kwargs)
    many = predict_novel(model, query, p_img, p_lab, batch_size=16, **kwargs)
    assert np.array_equal(one, many)
    assert 0 < many.mean() < 1  # both classes present: the comparison has teeth


def test_several_queries_sharing_forwards_predict_what_each_predicts_alone():
    """Queries of different sizes under one prompt, tiles and seam crops batched across them, equal one-by-one runs."""
    model = _loud_micro()
    rng = np.random.default_rng(6)
    queries = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(96, 96, 3), (70, 110, 3), (96, 96, 3)]]
    p_img, p_lab = _random_prompt(model, 1)
    kwargs = dict(working_size=96, grid=3, seam_repair=True, seam_band=1, device=torch.device("cpu"))
    alone = [predict_novel(model, q, p_img, p_lab, batch_size=4, **kwargs) for q in queries]
    together = predict_novel_many(model, queries, p_img, p_lab, batch_size=16, **kwargs)
    assert [m.shape for m in together] == [q.shape[:2] for q in queries]
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(together[0], together[2])  # the queries really differ
    assert all(0 < m.mean() < 1 for m in together)


def test_a_novel_class_is_a_one_prompt_ensemble_with_the_binary_palette():
    """A learned prompt that happens to be an image and a black/white mask predicts what that base prompt does."""
    model = _loud_micro()
    rng = np.random.default_rng(5)
    query = rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)
    image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    mask_rgb = BINARY_PALETTE[rng.integers(0, 2, (6, 6)).repeat(16, 0).repeat(16, 1)]
    tile = model.config.tile_size
    kwargs = dict(working_size=96, grid=1, seam_repair=False, seam_band=1, device=torch.device("cpu"), batch_size=4)
    base = predict_base(model, query, [BasePrompt(image, mask_rgb)], BINARY_PALETTE, **kwargs)
    novel = predict_novel(
        model, query, to_tensor(resize_image(image, tile)), to_tensor(resize_nearest(mask_rgb, tile)), **kwargs
    )
    assert np.array_equal(base, novel)
    assert 0 < novel.mean() < 1


def test_the_label_half_of_a_fully_masked_query_is_never_read():
    """The first pass leaves the query's label half blank: any content there gives the same prediction."""
    model = _loud_micro()
    h, w = model.config.tile_size
    prompts, queries, lowers = _coloured_case(model, np.random.default_rng(6), 3)
    whole = [np.ones((h // model.config.patch_size, w // model.config.patch_size), bool)] * 3
    kwargs = dict(batch_size=4, device=torch.device("cpu"))
    blank = predict_ensembled(model, queries, None, whole, prompts, **kwargs)
    coloured = predict_ensembled(model, queries, lowers, whole, prompts, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(blank, coloured, strict=True))
    # With the band masks of seam repair the label half is read: the same colours then change the prediction.
    band = [m.copy() for m in whole]
    for m in band:
        m[:, : m.shape[1] // 2] = False
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            predict_ensembled(model, queries, None, band, prompts, **kwargs),
            predict_ensembled(model, queries, lowers, band, prompts, **kwargs),
            strict=True,
        )
    )


def test_flip_dims_lists_the_mirrors_and_refuses_other_counts():
    assert flip_dims(1) == ((),)
    assert flip_dims(2) == ((), (3,))
    assert flip_dims(4) == ((), (3,), (2,), (2, 3))
    with pytest.raises(ValueError, match="flips must be 1, 2 or 4"):
        flip_dims(3)


@pytest.mark.parametrize("seam_repair", [False, True])
def test_averaged_mirrors_make_the_prediction_of_a_mirrored_query_the_mirrored_prediction(seam_repair):
    """With all four mirrors averaged, mirroring the query mirrors the answer, seam repair's one-sided band masks
    included (each is mirrored with its crop); one pass alone does not, so the check has teeth."""
    model = _loud_micro()
    h, w = model.config.tile_size
    # Tiles of exactly the model's size: a resize (nearest above all) would itself break the symmetry under test.
    query = np.random.default_rng(7).integers(0, 255, (2 * h, 2 * w, 3), dtype=np.uint8)
    p_img, p_lab = _random_prompt(model, 2)
    kwargs = dict(working_size=2 * h, grid=2, seam_repair=seam_repair, seam_band=1, device=torch.device("cpu"))

    def agreement(flips: int, axis: int) -> float:
        plain = predict_novel(model, query, p_img, p_lab, batch_size=8, flips=flips, **kwargs)
        mirrored = predict_novel(model, np.flip(query, axis).copy(), p_img, p_lab, batch_size=8, flips=flips, **kwargs)
        assert 0 < plain.mean() < 1
        return float((np.flip(mirrored, axis) == plain).mean())

    for axis in (0, 1):
        # Sums of the same four maps in another order may differ in the last bit: allow a stray pixel.
        assert agreement(4, axis) > 0.999
        assert agreement(1, axis) < 0.98


def test_one_mirror_is_the_plain_prediction_and_more_change_it():
    model = _loud_micro()
    query = np.random.default_rng(8).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    p_img, p_lab = _random_prompt(model, 3)
    kwargs = dict(working_size=96, grid=3, seam_repair=False, seam_band=1, device=torch.device("cpu"), batch_size=16)
    default = predict_novel(model, query, p_img, p_lab, **kwargs)
    assert np.array_equal(default, predict_novel(model, query, p_img, p_lab, flips=1, **kwargs))
    assert not np.array_equal(default, predict_novel(model, query, p_img, p_lab, flips=2, **kwargs))


def test_averaged_mirrors_mirror_a_one_sided_patch_mask_with_the_query():
    """Seam repair reads the first pass's colours under a band mask; a mask covering one side of the tile must be
    mirrored with the query and its label half, or the mirrored passes re-predict the wrong side."""
    model = _loud_micro()
    h, w = model.config.tile_size
    prompts, queries, lowers = _coloured_case(model, np.random.default_rng(9), 2)
    band = np.zeros((h // model.config.patch_size, w // model.config.patch_size), bool)
    band[:, :1] = True  # the left patch column only
    kwargs = dict(batch_size=4, device=torch.device("cpu"), flips=4)
    plain = predict_ensembled(model, queries, lowers, [band] * 2, prompts, **kwargs)
    for axis in (0, 1):
        mirrored = predict_ensembled(
            model, [np.flip(q, axis).copy() for q in queries], [np.flip(low, axis).copy() for low in lowers],
            [np.flip(band, axis).copy()] * 2, prompts, **kwargs,
        )  # fmt: skip
        for a, b in zip(plain, mirrored, strict=True):
            assert len(np.unique(a)) > 1
            assert (np.flip(b, axis) == a).mean() > 0.999
