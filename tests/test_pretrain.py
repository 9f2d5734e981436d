"""In-context pretraining (fewseg.pretrain) on the micro preset: episodes, a few steps, resume, output formats.

Only a handful of steps ever run here; the pretraining itself is not under test, its machinery is.
"""

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fewseg.checkpoints import load_base_model
from fewseg.config import load_config, pretraining_settings
from fewseg.data import mark_one_class, query_half_patches
from fewseg.model import PRESETS, fingerprint
from fewseg.palette import BINARY_PALETTE
from fewseg.pretrain import (
    curriculum_classes,
    pretrain,
    pretrain_stage,
    prompt_blind_baseline,
    training_sample,
    validate,
    validation_episodes,
)
from fewseg.weights import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
MICRO = PRESETS["micro"]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread for tiny models


def _settings(**changes) -> dict:
    settings = pretraining_settings(load_config(ROOT / "config.yaml", check_paths=False))
    settings["runtime"] = {"device": "cpu", "precision": "fp32"}
    settings["pretraining"].update(
        {"preset": "micro", "steps": 4, "batch_size": 2, "warmup_steps": 1, "working_size": 64, "val_episodes": 2,
         "val_every": 2, "checkpoint_every": 2, "curriculum_steps": 2, "classes": [2, 4], **changes}
    )  # fmt: skip
    return settings


def _run(tmp_path: Path, name: str, settings: dict, **kwargs) -> dict:
    out = tmp_path / name
    return pretrain(out / "model.pt", out / "history.csv", out / "history.png", out / "ckpt", settings, **kwargs)


def _sample(step: int, index: int, **changes) -> dict:
    return training_sample(_settings(**changes)["pretraining"], step, index, MICRO.tile_size, MICRO.grid_size)


# --- episodes --------------------------------------------------------------------------------------------------


def test_episodes_are_deterministic_and_differ_across_steps_and_samples():
    a, b = _sample(3, 1), _sample(3, 1)
    for key in ("image", "label", "ids", "palette", "mask"):
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["image"], _sample(4, 1)["image"])
    assert not np.array_equal(a["image"], _sample(3, 2)["image"])
    assert not np.array_equal(a["image"], _sample(3, 1, seed=1)["image"])


def test_labels_use_one_random_palette_for_both_halves():
    palettes = []
    for index in range(6):
        s = _sample(0, index)
        assert s["image"].shape == (128, 64, 3) and s["label"].shape == (128, 64, 3)
        assert np.array_equal(s["label"], s["palette"][s["ids"]])  # both halves painted with the same colours
        assert s["ids"].max() < len(s["palette"])
        palettes.append(s["palette"])
    assert len({p.tobytes() for p in palettes}) == len(palettes)  # a fresh palette every sample


def test_pair_kinds_and_their_masks():
    grid = MICRO.grid_size
    same = _sample(0, 0, same_context_share=1.0)
    top, bottom = np.split(same["ids"], 2)
    assert set(np.unique(top).tolist()) == set(np.unique(bottom).tolist())
    assert np.array_equal(same["mask"], query_half_patches(grid))
    kinds = [_sample(0, i, same_context_share=0.0, classes=[4, 4], mask_ratio=0.5) for i in range(8)]
    mixed = [s for s in kinds if not np.array_equal(s["mask"], query_half_patches(grid))]
    assert mixed, "mixed pairs never produced different class sets"
    for s in mixed:
        top, bottom = np.split(s["ids"], 2)
        assert set(np.unique(top).tolist()) != set(np.unique(bottom).tolist())
        assert s["mask"].sum() == round(0.5 * grid[0] * grid[1])
        assert s["mask"][: s["mask"].size // 2].any()  # the prompt half is masked too


def test_binary_episodes_mark_one_shared_class_white_on_black():
    grid = MICRO.grid_size
    drawn = [_sample(0, i, binary_prob=0.5, classes=[4, 4]) for i in range(12)]
    binary = [s for s in drawn if len(s["palette"]) == 2]
    assert 0 < len(binary) < len(drawn)  # about half of the episodes, the rest as before
    for s in binary:
        assert np.array_equal(s["palette"], BINARY_PALETTE) and np.array_equal(s["label"], BINARY_PALETTE[s["ids"]])
        top, bottom = np.split(s["ids"], 2)
        assert top.any() and bottom.any() and not top.all()  # the marked class is in both halves, not everywhere
        assert np.array_equal(s["mask"], query_half_patches(grid))  # the query half is what is asked
    # at binary_prob 0 nothing extra is drawn: the recipes written before the setting keep their exact episodes
    without = dict(_settings()["pretraining"])
    del without["binary_prob"]
    for i in range(3):
        old = training_sample(without, 2, i, MICRO.tile_size, MICRO.grid_size)
        assert np.array_equal(old["image"], _sample(2, i, binary_prob=0.0)["image"])


def test_marking_picks_a_shared_class_and_can_skip_the_filler():
    a, b = np.array([[0, 1, 2], [0, 0, 3]]), np.array([[0, 2, 2], [4, 0, 0]])  # shared: 0 and 2
    picked = {mark_one_class(a, b, np.random.default_rng(i))[0].tobytes() for i in range(20)}
    assert picked == {(a == 0).astype(np.uint8).tobytes(), (a == 2).astype(np.uint8).tobytes()}
    for i in range(5):  # base training's path may mark 0; pretraining's prefers a class other than the filler
        ma, mb = mark_one_class(a, b, np.random.default_rng(i), skip_zero=True)
        assert np.array_equal(ma, a == 2) and np.array_equal(mb, b == 2) and ma.dtype == np.uint8
    assert mark_one_class(np.array([0, 0]), np.array([0, 1]), np.random.default_rng(0), skip_zero=True)[0].sum() == 2
    assert mark_one_class(np.array([1]), np.array([2]), np.random.default_rng(0)) is None  # nothing shared


def test_binary_validation_scores_the_marked_class_alone():
    p = _settings(val_episodes=4, binary_prob=0.5)["pretraining"]
    episodes = validation_episodes(p, MICRO.tile_size, MICRO.grid_size, binary=True)
    assert all(len(e["palette"]) == 2 for e in episodes)
    assert not any(np.array_equal(a["image"], b["image"]) for a in episodes
                   for b in validation_episodes(p, MICRO.tile_size, MICRO.grid_size))  # fmt: skip
    assert validate(_Oracle(), episodes, 2, torch.device("cpu"), "fp32", marked_only=True) == pytest.approx(1.0)

    class _Nothing(_Oracle):  # marks nothing: the black rest is right, the marked class missed
        def forward(self, images, labels, mask):
            return torch.zeros_like(labels) - 1.0

    assert validate(_Nothing(), episodes, 2, torch.device("cpu"), "fp32", marked_only=True) == 0.0
    assert validate(_Nothing(), episodes, 2, torch.device("cpu"), "fp32") > 0.3  # what the plain mIoU would credit
    shares = [float((e["ids"][MICRO.tile_size[0] :] == 1).mean()) for e in episodes]
    assert prompt_blind_baseline(episodes, MICRO.tile_size[0], marked_only=True) == pytest.approx(np.mean(shares))


def test_curriculum_grows_classes_per_scene():
    p = _settings(classes=[2, 8], curriculum_steps=60)["pretraining"]
    assert [curriculum_classes(s, p) for s in (0, 30, 60, 1000)] == [2, 5, 8, 8]
    p["curriculum_steps"] = 0
    assert curriculum_classes(0, p) == 8
    early = [len(_sample(0, i, classes=[2, 8], curriculum_steps=60)["palette"]) for i in range(6)]
    assert max(early) == 2


def test_held_out_episodes_come_from_their_own_stream():
    p = _settings(val_episodes=3)["pretraining"]
    val = validation_episodes(p, MICRO.tile_size, MICRO.grid_size)
    again = validation_episodes(p, MICRO.tile_size, MICRO.grid_size)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(val, again, strict=True))
    train = [_sample(step, i) for step in range(3) for i in range(2)]
    assert not any(np.array_equal(v["palette"], t["palette"]) for v in val for t in train)
    assert all(np.array_equal(v["mask"], query_half_patches(MICRO.grid_size)) for v in val)


class _Oracle(torch.nn.Module):
    """Returns the true label canvas: validation must score it 1.0 once decoded with each episode's palette."""

    def __init__(self):
        super().__init__()
        self.config = MICRO

    def forward(self, images, labels, mask):
        return labels


def test_validation_decodes_with_each_episodes_palette():
    p = _settings(val_episodes=3)["pretraining"]
    episodes = validation_episodes(p, MICRO.tile_size, MICRO.grid_size)
    assert validate(_Oracle(), episodes, 2, torch.device("cpu"), "fp32") == pytest.approx(1.0)
    shuffled = copy.deepcopy(episodes)
    for e in shuffled:
        e["palette"] = e["palette"][::-1].copy()  # decoding with the wrong colours must not score well
    assert validate(_Oracle(), shuffled, 2, torch.device("cpu"), "fp32") < 0.5


def test_prompt_blind_baseline_paints_the_main_prompt_class():
    palette = np.zeros((3, 3), dtype=np.uint8)
    ids = np.array([[0, 0, 1, 2], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 2, 2]], dtype=np.uint8)
    # prompt rows 0-1: class 0 dominates; query rows 2-3: class 0 on 3 of 8 pixels -> IoU 3/8, classes 1, 2 -> 0
    assert prompt_blind_baseline([{"ids": ids, "palette": palette}], 2) == pytest.approx((3 / 8 + 0 + 0) / 3)


# --- training --------------------------------------------------------------------------------------------------


def test_a_few_steps_write_loadable_outputs(tmp_path):
    result = _run(tmp_path, "run", _settings(steps=3))
    out = tmp_path / "run"
    assert np.isfinite(result["final_val_miou"]) and 0.0 <= result["final_val_miou"] <= 1.0
    assert 0.0 < result["val_baseline_miou"] <= 1.0
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0].startswith("step,") and len(lines) == 4
    assert "val_binary_iou" not in lines[0] and result["final_val_binary_iou"] is None  # binary_prob 0: no such curve
    losses = [float(line.split(",")[lines[0].split(",").index("loss")]) for line in lines[1:]]
    assert all(np.isfinite(losses))
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "ckpt" / "resume.pt").exists()
    model, meta = load_base_model(out / "model.pt")
    assert model.config == MICRO and meta["fingerprint"] == result["fingerprint"] == fingerprint(model)
    # The same file as model.weights: the architecture comes from the file, the weights are the same.
    as_weights = load_pretrained(out / "model.pt")
    assert as_weights.config == MICRO and fingerprint(as_weights) == result["fingerprint"]


def test_same_settings_same_weights_and_resume_reaches_them(tmp_path, caplog):
    settings = _settings(steps=5, checkpoint_every=2)
    whole = _run(tmp_path, "whole", settings)
    stopped = _run(tmp_path, "resumed", settings, stop_after=3)
    assert stopped["stopped_at"] == 3
    assert not (tmp_path / "resumed" / "model.pt").exists()
    assert (tmp_path / "resumed" / "ckpt" / "resume.pt").is_file()
    with caplog.at_level(logging.INFO, logger="fewseg.pretrain"):
        resumed = _run(tmp_path, "resumed", settings)
    assert "resuming pretraining at step 3 of 5" in caplog.text
    assert resumed["fingerprint"] == whole["fingerprint"]
    history = [(tmp_path / name / "history.csv").read_text() for name in ("whole", "resumed")]
    assert history[0] == history[1]
    # A checkpoint written by other settings is not resumed from.
    other = _settings(steps=5, checkpoint_every=2, lr=5e-4)
    _run(tmp_path, "other", other, stop_after=2)
    (tmp_path / "other" / "ckpt" / "resume.pt").replace(tmp_path / "whole" / "ckpt" / "resume.pt")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fewseg.pretrain"):
        again = _run(tmp_path, "whole", settings)
    assert "resuming" not in caplog.text and again["fingerprint"] == whole["fingerprint"]


def test_binary_share_adds_its_held_out_curve(tmp_path):
    result = _run(tmp_path, "run", _settings(steps=2, binary_prob=0.5))
    header, *rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    column = header.split(",").index("val_binary_iou")
    assert [float(r.split(",")[column]) for r in rows if r.split(",")[column]] == [result["final_val_binary_iou"]]
    assert 0.0 <= result["final_val_binary_iou"] <= 1.0 and result["binary_prob"] == 0.5


def test_fp16_output_halves_the_file(tmp_path):
    full = _run(tmp_path, "fp32", _settings(steps=2))
    half = _run(tmp_path, "fp16", _settings(steps=2, fp16=True))
    size32 = (tmp_path / "fp32" / "model.pt").stat().st_size
    size16 = (tmp_path / "fp16" / "model.pt").stat().st_size
    assert size16 < 0.6 * size32
    model, meta = load_base_model(tmp_path / "fp16" / "model.pt")
    assert meta["dtype"] == "float16" and meta["fingerprint"] == half["fingerprint"] == fingerprint(model)
    reference, _ = load_base_model(tmp_path / "fp32" / "model.pt")
    assert full["fingerprint"] != half["fingerprint"]
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"warmup_steps": 4}, "warmup_steps"),
        ({"classes": [5, 3]}, "pretraining/classes"),
        ({"working_size": 32}, "working_size"),
    ],
)
def test_bad_settings_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, "bad", _settings(**changes))


def test_stage_glue_writes_the_rule_outputs(tmp_path):
    output = SimpleNamespace(
        model=str(tmp_path / "model.pt"), history=str(tmp_path / "h.csv"), plot=str(tmp_path / "h.png")
    )
    params = SimpleNamespace(settings=_settings(steps=2), checkpoint_dir=str(tmp_path / "ckpt"))
    pretrain_stage(SimpleNamespace(), output, params)
    assert all(Path(p).is_file() for p in vars(output).values())


def test_a_second_stage_continues_from_the_first_stages_weights(tmp_path, caplog):
    first = _run(tmp_path, "first", _settings(steps=2))
    start = str(tmp_path / "first/model.pt")
    with caplog.at_level(logging.INFO, logger="fewseg.pretrain"):
        second = _run(tmp_path, "second", _settings(steps=2, start_from=start))
    assert f"continuing from {start} (fingerprint {first['fingerprint']})" in caplog.text
    assert second["start_from"] == start and second["fingerprint"] != first["fingerprint"]
    # the workflow hands the file it found to the stage, which continues from it
    output = SimpleNamespace(**{k: str(tmp_path / "stage" / f"{k}.x") for k in ("model", "history", "plot")})
    params = SimpleNamespace(settings=_settings(steps=2, start_from="not/here.pt"), checkpoint_dir=str(tmp_path / "c"))
    pretrain_stage(SimpleNamespace(start=start), output, params)
    assert load_base_model(output.model)[1]["fingerprint"] == second["fingerprint"]
