"""The best support pair: candidate windows, the choice on the other fitting tiles, its file, and phase 1 from it."""

from pathlib import Path

import numpy as np
import pytest
import torch

import fewseg.prompt
from fewseg.checkpoints import load_prompt, save_base_model
from fewseg.config import load_config, pair_settings, prompt_settings
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
    rng = np.random.default_rng(1)
    fit = [(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), _mask(64, [(0, 0, 32)])) for _ in range(3)]
    scored_on = []

    def fake_iou(model, prompt, tiles, side, device, precision="fp32", batch_size=16):
        scored_on.append([id(t) for t in tiles])
        return float(len(scored_on) == 2)  # the second candidate is the best

    monkeypatch.setattr(fewseg.prompt, "support_iou", fake_iou)
    model = build_model("micro")
    prompt, window, iou = select_support_pair(model, fit, side=32, limit=3, device=torch.device("cpu"))
    assert iou == 1.0 and window.tile == 1
    for candidate_tile, tiles in zip(range(3), scored_on, strict=True):
        assert tiles == [id(t) for k, t in enumerate(fit) if k != candidate_tile]
    expected = fixed_prompt(fit[1][0][:32, :32], fit[1][1][:32, :32], model.config.tile_size)
    assert torch.equal(prompt.prompt_image, expected.prompt_image)


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
