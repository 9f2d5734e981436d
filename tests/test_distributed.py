"""Base training over processes: two gloo ranks under torchrun equal one process with the same global batch."""

from pathlib import Path

import pytest
import torch

from fewseg.checkpoints import load_base_model
from fewseg.config import base_training_settings, load_config
from fewseg.distributed import launch_train_base
from fewseg.train import train_base

TEST_CONFIG = Path(__file__).parent / "config.test.yaml"


def _settings(**training) -> dict:
    config = load_config(TEST_CONFIG, check_paths=False)
    config["runtime"]["device"] = "cpu"
    config["base_training"].update(
        {"steps": 4, "batch_size": 4, "grad_accum": 1, "val_tiles": 0.0, "checkpoint_every": 2, "blur_prob": 0.5,
         "lr": 1e-3, "warmup_steps": 1, **training}
    )  # fmt: skip
    return base_training_settings(config)


def _train(tiles, tmp_path: Path, name: str, processes: int = 1, **training) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    out.mkdir()
    job = {
        "tiles": tiles, "out_model": str(out / "base.pt"), "out_history": str(out / "history.csv"),
        "out_plot": str(out / "history.png"), "checkpoint_dir": str(out / "ckpt"), "settings": _settings(**training),
    }  # fmt: skip
    if processes > 1:
        with open(out / "log.txt", "w") as log:
            launch_train_base(processes, job, out / "ckpt", log)
        assert "[rank 0/2]" in (out / "log.txt").read_text()
    else:
        train_base(**job)
    assert (out / "ckpt" / "last.pt").is_file()
    model, meta = load_base_model(out / "base.pt")
    assert meta["processes"] == processes
    return model.state_dict()


def _assert_close(a: dict, b: dict, atol: float) -> None:
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"largest difference {worst:.2e}"


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tiles, tmp_path):
    single = _train(tiles, tmp_path, "one")
    double = _train(tiles, tmp_path, "two", processes=2)
    _assert_close(single, double, atol=1e-5)
    # A different global batch does change the weights: the comparison has teeth.
    other = _train(tiles, tmp_path, "other", batch_size=2)
    assert max(float((single[k] - other[k]).abs().max()) for k in single) > 1e-4


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tiles, tmp_path):
    full = _train(tiles, tmp_path, "full")
    accumulated = _train(tiles, tmp_path, "accum", batch_size=2, grad_accum=2)
    _assert_close(full, accumulated, atol=1e-5)


def test_batch_must_split_over_the_processes(tiles, tmp_path, monkeypatch):
    import fewseg.collectives

    monkeypatch.setattr(fewseg.collectives, "rank_and_world", lambda: (0, 2))  # as rank 0 of 2
    with pytest.raises(ValueError, match="batch_size 3 does not split over 2 processes"):
        _train(tiles, tmp_path, "odd", batch_size=3)
