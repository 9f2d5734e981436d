"""The best support pair: candidate windows, the choice on the other fitting tiles, its file, and phase 1 from it."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fewseg.prompt
from fewseg.checkpoints import load_prompt, save_base_model
from fewseg.config import load_config, pair_settings, prompt_settings
from fewseg.data import resize_image
from fewseg.model import build_model
from fewseg.palette import BINARY_PALETTE, to_tensor
from fewseg.prompt import fixed_prompt, pair_candidates, select_support_pair, support_iou
from fewseg.train import select_pair, train_prompt

TEST_CONFIG = Path(__file__).parent / "config.test.yaml"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def config() -> dict:
    config = load_config(TEST_CONFIG, check_paths=False)
    config["runtime"]["device"] = "cpu"
    config["prompt_training"].update({"phase1": {"steps": 2, "lr": 1e-9}, "val_every": 1, "checkpoint_every": 1})
    return config


@pytest.fixture(scope="module")
def settings(config) -> dict:
    return prompt_settings(config, 10)


@pytest.fixture(scope="module")
def pair(config) -> dict:
    return pair_settings(config, 10)


def test_the_pair_reads_only_its_own_settings(config, pair):
    assert set(pair["training"]) == {"working_size", "crop_size", "max_crop_size", "holdout", "pair_candidates"}
    changed = {**config, "prompt_training": {**config["prompt_training"], "phase1": {"steps": 9, "lr": 1.0}}}
    assert pair_settings(changed, 10) == pair


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "base.pt"
    save_base_model(path, build_model("micro"))
    return path


def _mask(size: int, boxes) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    for y, x, h in boxes:
        mask[y : y + h, x : x + h] = True
    return mask


def test_candidates_are_the_richest_windows_of_each_tile_in_turn():
    rich = _mask(64, [(0, 0, 32)])  # fills the top-left window
    poor = _mask(64, [(40, 40, 4)])  # a little in the four windows around it
    empty = np.zeros((64, 64), bool)
    found = pair_candidates([rich, poor, empty], side=32, limit=10)
    assert found[0].tile == 0 and (found[0].y, found[0].x, found[0].fraction) == (0, 0, 1.0)
    assert found[1].tile == 1  # the second tile's best comes before the first tile's second best
    assert all(c.tile != 2 for c in found)  # windows without the class are never offered
    assert all(c.fraction >= 0.01 for c in found)
    assert len(pair_candidates([rich, poor], side=32, limit=2)) == 2


def test_a_fixed_prompt_is_the_crop_and_its_white_on_black_mask():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = _mask(32, [(8, 8, 8)])
    prompt = fixed_prompt(image, mask, (32, 32))
    assert torch.equal(prompt.prompt_image, to_tensor(image))
    assert torch.equal(prompt.prompt_label, to_tensor(BINARY_PALETTE[mask.astype(np.uint8)]))


def test_the_choice_is_scored_on_the_other_fitting_tiles_only(monkeypatch):
    """The pair is chosen by its IoU on the fitting tiles other than its own, never on held-out ones."""
    fit = [(np.full((64, 64, 3), 40 * (t + 1), np.uint8), _mask(64, [(0, 0, 32)])) for t in range(3)]
    model = build_model("micro")
    tile_of_value = {
        round(float(to_tensor(resize_image(image, model.config.tile_size))[0, 0, 0, 0]), 4): t
        for t, (image, _) in enumerate(fit)
    }
    scored_on: dict[int, set[int]] = {}

    def fake_predictions(model, prompt, crops, device, precision, batch_size):
        own = tile_of_value[round(float(prompt.prompt_image.detach()[0, 0, 0, 0]), 4)]
        seen = scored_on.setdefault(own, set())
        for image, truth in crops:
            seen.add(tile_of_value[round(float(to_tensor(image)[0, 0, 0, 0]), 4)])
            yield [(truth if own == 1 else np.zeros_like(truth), truth)]  # the second tile's window is perfect

    monkeypatch.setattr(fewseg.prompt, "_predicted_crops", fake_predictions)
    prompt, window, iou = select_support_pair(model, fit, side=32, limit=3, device=torch.device("cpu"))
    assert iou == 1.0 and window.tile == 1
    assert scored_on == {own: {t for t in range(3) if t != own} for own in range(3)}
    expected = fixed_prompt(fit[1][0][:32, :32], fit[1][1][:32, :32], model.config.tile_size)
    assert torch.equal(prompt.prompt_image, expected.prompt_image)


@pytest.mark.parametrize("seed", range(4))
def test_the_pruned_search_chooses_what_scoring_every_window_on_every_crop_chooses(monkeypatch, caplog, seed):
    """Windows stop once their IoU bound falls below the best so far: the same window and IoU as scoring every
    window on every crop (the first of the best on ties), with fewer predictions. Each window's predictions are
    drawn from its own noise level (some windows miss much, some mark much), fixed per window and crop."""
    rng = np.random.default_rng(seed)
    fit = [
        (rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), _mask(128, [(int(y), int(x), 8) for y, x in spots]))
        for spots in (rng.integers(0, 120, (4, 2)) for _ in range(3))
    ]
    side, device = 32, torch.device("cpu")
    model = build_model("micro")
    candidates = pair_candidates([m for _, m in fit], side, 16)
    noise = {}  # per window: (share of class pixels missed, share of other pixels marked)

    def fake_predictions(model, prompt, crops, device, precision, batch_size):
        key = prompt.prompt_image.detach().numpy().tobytes()
        miss, mark = noise.setdefault(key, (rng.uniform(0, 0.9), rng.uniform(0, 0.3) ** 2))
        for start in range(0, len(crops), batch_size):
            batch = []
            for image, truth in crops[start : start + batch_size]:
                draw = np.random.default_rng(list(key[:64]) + list(image.tobytes()[:64])).random(truth.shape)
                pred = np.where(truth > 0, draw >= miss, draw < mark).astype(np.uint8)
                batch.append((pred, truth))
            yield batch

    monkeypatch.setattr(fewseg.prompt, "_predicted_crops", fake_predictions)
    exhaustive = []
    for c in candidates:
        window = (slice(c.y, c.y + side), slice(c.x, c.x + side))
        plain = fixed_prompt(fit[c.tile][0][window], fit[c.tile][1][window], model.config.tile_size)
        others = [t for k, t in enumerate(fit) if k != c.tile]
        crops = fewseg.prompt.support_crops(others, side, model.config.tile_size)
        found = fewseg.prompt._Counts()
        for batch in fake_predictions(model, plain, crops, device, "fp32", 16):
            for pred, truth in batch:
                found.add(pred, truth)
        exhaustive.append(found.iou())
    assert len(set(exhaustive)) > 3  # the windows really differ
    with caplog.at_level("INFO", logger="fewseg.prompt"):
        _, chosen, iou = select_support_pair(model, fit, side, 16, device)
    assert chosen == candidates[int(np.argmax(exhaustive))]
    assert iou == max(exhaustive)
    made, total = map(int, re.search(r"(\d+) of their (\d+) crop predictions", caplog.text).groups())
    assert total == len(candidates) * 2 * (128 // side) ** 2 and made < total


def test_a_tie_goes_to_the_first_window(monkeypatch):
    fit = [(np.full((64, 64, 3), 9 * t, np.uint8), _mask(64, [(0, 0, 40)])) for t in range(3)]

    def same_for_all(model, prompt, crops, device, precision, batch_size):
        yield [(truth, truth) for _, truth in crops]

    monkeypatch.setattr(fewseg.prompt, "_predicted_crops", same_for_all)
    model = build_model("micro")
    _, chosen, iou = select_support_pair(model, fit, 32, 6, torch.device("cpu"))
    assert iou == 1.0 and chosen == pair_candidates([m for _, m in fit], 32, 6)[0]


def test_the_prompt_predicts_the_query_half_with_the_whole_canvas_loss_and_gradient():
    """Decoding only the query half is what the loss and inference read: the same pixels, loss and gradient."""
    from fewseg.data import query_half_patches
    from fewseg.prompt import LearnablePrompt

    torch.manual_seed(0)
    model = build_model("micro").requires_grad_(False)
    h, w = model.config.tile_size
    g = torch.Generator().manual_seed(3)
    query, target = torch.randn(2, 3, h, w, generator=g), torch.randn(2, 3, h, w, generator=g)
    grads = []
    for half in (True, False):
        prompt = LearnablePrompt((h, w), init_std=0.5, generator=torch.Generator().manual_seed(1))
        images, labels = prompt.canvases(query, target)
        mask = torch.from_numpy(query_half_patches(model.config.grid_size))[None]
        if half:
            pred = prompt(model, query)
            loss = model.loss(pred, target, torch.ones(1, mask.sum(), dtype=torch.bool))
        else:
            pred = model(images, labels, mask)
            loss = model.loss(pred, labels.detach(), mask)
        loss.backward()
        grads.append((pred.detach(), float(loss.detach()), prompt.prompt_image.grad, prompt.prompt_label.grad))
    (half_pred, half_loss, *half_grads), (full_pred, full_loss, *full_grads) = grads
    assert half_pred.shape == query.shape
    assert torch.allclose(half_pred, full_pred[:, :, h:], atol=1e-5)
    assert half_loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(half_grads, full_grads, strict=True):
        assert b.abs().sum() > 0 and torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_support_iou_counts_the_class_over_the_crops():
    model = build_model("micro").train()
    image = np.zeros((64, 64, 3), np.uint8)
    prompt = fixed_prompt(image, _mask(64, [(0, 0, 64)]), model.config.tile_size)
    iou = support_iou(model, prompt, [(image, _mask(64, [(0, 0, 16)]))], 32, torch.device("cpu"))
    assert 0.0 <= iou <= 1.0
    assert support_iou(model, prompt, [], 32, torch.device("cpu")) is None
    assert model.training  # evaluated in eval mode, handed back as it came


def test_pair_file_starts_phase_one_and_is_required_by_it(settings, pair, tiles, base_model, tmp_path):
    support = [{"stem": t["stem"], "image": t["image"], "label": t["label"]} for t in tiles[:3]]
    result = select_pair(base_model, support, tmp_path / "pair.pt", pair)
    saved = load_prompt(tmp_path / "pair.pt")
    assert saved["cls"] == 10 and saved["meta"]["kind"] == "support_pair"
    assert saved["meta"]["best_held_out_iou"] == result["best_held_out_iou"] is not None
    assert saved["meta"]["source"]["stem"] in {t["stem"] for t in support}
    assert saved["meta"]["source"]["stem"] not in saved["meta"]["held_out"]
    again = select_pair(base_model, support, tmp_path / "again.pt", pair)
    assert again == result  # deterministic
    with pytest.raises(ValueError, match="no support pair was given"):
        train_prompt(base_model, support, tmp_path / "p.pt", tmp_path / "h.csv", tmp_path / "ck", settings, 1)
    train_prompt(base_model, support, tmp_path / "p.pt", tmp_path / "h.csv", tmp_path / "ck", settings, 1,
                 init_prompt=tmp_path / "pair.pt")  # fmt: skip
    learned = load_prompt(tmp_path / "p.pt")
    # at a vanishing learning rate the learned prompt is still the pair it started from
    assert torch.allclose(learned["prompt_label"], saved["prompt_label"], atol=1e-5)
    assert torch.allclose(learned["prompt_image"], saved["prompt_image"], atol=1e-5)


def test_a_class_absent_from_every_support_tile_is_named(pair, base_model, tmp_path):
    from fewseg.io import write_png

    support = []
    for i in range(2):
        write_png(tmp_path / f"s{i}.png", np.zeros((96, 96, 3), np.uint8))
        write_png(tmp_path / f"s{i}_label.png", np.zeros((96, 96), np.uint8))
        support.append(
            {"stem": f"s{i}", "image": str(tmp_path / f"s{i}.png"), "label": str(tmp_path / f"s{i}_label.png")}
        )
    with pytest.raises(ValueError, match="class 10: no support window shows the class"):
        select_pair(base_model, support, tmp_path / "pair.pt", pair)
    assert not (tmp_path / "pair.pt").exists()
