"""Base and prompt training in one process on tiny tiles: typed settings, and resuming after a kill."""

import dataclasses
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

import fewseg.train
from fewseg.checkpoints import load_base_model, load_prompt, save_base_model
from fewseg.config import base_training_settings, load_config, phase_settings, prompt_settings
from fewseg.model import build_model, fingerprint
from fewseg.train import BaseTrainingSettings, PromptTrainingSettings, train_base, train_prompt

TEST_CONFIG = Path(__file__).parent / "config.test.yaml"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def config() -> dict:
    config = load_config(TEST_CONFIG, check_paths=False)
    config["runtime"]["device"] = "cpu"
    config["base_training"].update({"steps": 4, "batch_size": 2, "checkpoint_every": 2, "val_every": 2})
    config["prompt_training"].update({"phase1": {"steps": 4, "lr": 1e-2}, "checkpoint_every": 2, "val_every": 2})
    return config


class Killed(Exception):
    """Stands in for a SIGKILL right after the first resume checkpoint is written."""


def _kill_after_first_checkpoint(monkeypatch) -> None:
    save = fewseg.train.save_torch

    def save_then_die(path, obj):
        save(path, obj)
        if "resume" in Path(path).name:
            raise Killed

    monkeypatch.setattr(fewseg.train, "save_torch", save_then_die)


def test_settings_are_typed_and_frozen(config):
    base = BaseTrainingSettings.from_slice(base_training_settings(config))
    assert (base.steps, base.batch_size, base.seed, base.device) == (4, 2, 0, "cpu")
    assert base.betas == (0.9, 0.999) and base.base_ids == (1, 2, 3, 4, 5, 6, 7) and base.num_colors == 8
    prompt = PromptTrainingSettings.from_slice(prompt_settings(config, 9))
    assert (prompt.cls, prompt.crop_size, prompt.max_crop_size, prompt.stride) == (9, 32, 64, 16)  # class's own
    assert prompt.phase(1).steps == 4 and prompt.phase(2).lr == config["prompt_training"]["phase2"]["lr"]
    with pytest.raises(FrozenInstanceError):
        base.steps = 5
    # each phase's job reads only its own phase: asking it for the other one is a bug, not a silent default
    first = PromptTrainingSettings.from_slice(phase_settings(config, 9, 1))
    assert first.phase(1) == prompt.phase(1) and "phase2" not in phase_settings(config, 9, 1)["training"]
    with pytest.raises(ValueError, match="no phase 2"):
        first.phase(2)
    assert PromptTrainingSettings.from_slice(phase_settings(config, 9, 2)).phase(2) == prompt.phase(2)
    broken = base_training_settings(config)
    broken["training"] = {k: v for k, v in broken["training"].items() if k != "val_pairs"}
    with pytest.raises(ValueError, match="lack 'val_pairs'"):
        BaseTrainingSettings.from_slice(broken)


def _train_base(tiles, out: Path, settings: dict) -> dict:
    return train_base(tiles, out / "base.pt", out / "history.csv", out / "history.png", out / "ckpt", settings)


def test_killed_base_training_resumes_to_the_same_weights(config, tiles, tmp_path, monkeypatch):
    settings = base_training_settings(config)
    whole = _train_base(tiles, tmp_path / "whole", settings)
    with monkeypatch.context() as m:
        _kill_after_first_checkpoint(m)
        with pytest.raises(Killed):
            _train_base(tiles, tmp_path / "killed", settings)
    assert (tmp_path / "killed/ckpt/resume.pt").is_file() and not (tmp_path / "killed/base.pt").exists()
    resumed = _train_base(tiles, tmp_path / "killed", settings)
    assert resumed["fingerprint"] == whole["fingerprint"]
    assert (tmp_path / "killed/history.csv").read_bytes() == (tmp_path / "whole/history.csv").read_bytes()
    assert not (tmp_path / "killed/ckpt/resume.pt").exists()
    model, _ = load_base_model(tmp_path / "whole/base.pt")
    torch.manual_seed(config["seed"])
    assert fingerprint(model) != fingerprint(build_model("micro"))  # training moved the weights


def test_killed_prompt_training_resumes_to_the_same_prompt(config, tiles, tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_base_model(tmp_path / "base.pt", build_model("micro"))
    settings = prompt_settings(config, 10)
    settings["training"] = {**settings["training"], "init": "random"}
    support = [{"stem": t["stem"], "image": t["image"], "label": t["label"]} for t in tiles[:3]]

    def run(name: str) -> dict:
        out = tmp_path / name
        train_prompt(tmp_path / "base.pt", support, out / "prompt.pt", out / "history.csv", out / "ckpt", settings, 1)
        return load_prompt(out / "prompt.pt")

    whole = run("whole")
    with monkeypatch.context() as m:
        _kill_after_first_checkpoint(m)
        with pytest.raises(Killed):
            run("killed")
    resumed = run("killed")
    assert torch.equal(resumed["prompt_image"], whole["prompt_image"])
    assert torch.equal(resumed["prompt_label"], whole["prompt_label"])
    assert resumed["meta"]["held_out"] == whole["meta"]["held_out"] and len(whole["meta"]["held_out"]) == 1
    assert not torch.equal(whole["prompt_image"], torch.zeros_like(whole["prompt_image"]))


def test_support_crops_are_resized_as_inference_resizes_queries(config, tiles):
    """Prompt training must see crops as inference sees query tiles: bicubic images, nearest-neighbour masks.
    A nearest-neighbour image (blocky at 2-4x) would teach the prompt a texture inference never shows it."""
    import numpy as np

    from fewseg.data import resize_image, resize_nearest
    from fewseg.io import read_image, read_label
    from fewseg.train import SupportCrops

    s = PromptTrainingSettings.from_slice(prompt_settings(config, 9))
    s = dataclasses.replace(s, brightness=(1.0, 1.0), blur_prob=0.0)
    crops = SupportCrops(tiles[:1], s, only_positive=False)
    image, label = read_image(tiles[0]["image"]), read_label(tiles[0]["label"]) > 0
    tile = (64, 64)
    enlarged = [k for k, (_, _, _, side) in enumerate(crops.items) if side < tile[0]]
    assert enlarged  # where the two resizes differ
    for k in enlarged:
        _, y, x, side = crops.items[k]
        got_image, got_mask = crops.sample(k, np.random.default_rng(k), tile, s)
        want_image = resize_image(image[y : y + side, x : x + side], tile)
        want_mask = resize_nearest(label[y : y + side, x : x + side].astype(np.uint8), tile)
        flips = [(slice(None, None, sy), slice(None, None, sx)) for sy in (1, -1) for sx in (1, -1)]
        assert any(
            np.array_equal(got_image, want_image[f]) and np.array_equal(got_mask, want_mask[f]) for f in flips
        ), k


def test_base_validation_does_not_depend_on_how_many_pairs_share_a_forward(config, tiles):
    """Held-out pairs are validated a training batch at a time (query half only): the figure equals one at a time."""
    from fewseg.data import TileStore
    from fewseg.palette import as_palette
    from fewseg.train import validate_base, validation_pairs

    torch.manual_seed(0)
    model = build_model("micro").train()
    s = BaseTrainingSettings.from_slice(base_training_settings(config))
    store = TileStore(tiles, s.working_size, as_palette(s.palette), 8)
    pairs = validation_pairs(len(tiles), 5, s.seed)  # batches of 2: two full and one short
    figures = [
        validate_base(model, store, pairs, dataclasses.replace(s, batch_size=size), torch.device("cpu"))
        for size in (1, 2, 8)
    ]
    assert figures[0] is not None and 0.0 <= figures[0] <= 1.0
    assert figures == pytest.approx([figures[0]] * 3, abs=1e-9)
    assert model.training  # handed back in the mode it came in
    assert validate_base(model, store, [], s, torch.device("cpu")) is None
