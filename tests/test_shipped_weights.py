"""The demo's shipped in-context weights: their digest, that they load, and how a missing file is handled."""

import hashlib
import re
from pathlib import Path

import pytest
import torch

from fewseg.checkpoints import load_base_model
from fewseg.config import ConfigError, check_config, load_yaml
from fewseg.model import fingerprint
from fewseg.model_config import PRESETS
from fewseg.weights import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = "resources/pretrain/tiny-incontext-8000.pt"
README = ROOT / "resources/pretrain/README.md"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_weights_match_their_recorded_digest_and_load():
    path = ROOT / SHIPPED
    recorded = re.search(r"sha256 `([0-9a-f]{64})`", README.read_text()).group(1)
    assert _digest(path) == recorded
    model = load_pretrained(path)
    data = torch.load(path, map_location="cpu", weights_only=False)
    assert (
        fingerprint(model)
        == data["fingerprint"]
        == re.search(r"fingerprint `([0-9a-f]{16})`", README.read_text()).group(1)
    )
    assert model.config.tile_size == PRESETS["tiny"].tile_size and model.config.depth == PRESETS["tiny"].depth
    as_base, _ = load_base_model(path)  # the same file is a base model too
    assert fingerprint(as_base) == fingerprint(model)
    assert path.stat().st_size < 8 * 2**20


def test_the_demo_starts_from_them():
    config = load_yaml(ROOT / "config.yaml")
    assert config["model"]["weights"] == SHIPPED
    assert config["model"]["missing_weights"] == "scratch"
    assert config["base_training"]["random_palette_prob"] == 1.0  # fine-tuned with the published random palettes
    assert config["prompt_training"]["init"] == "support_pair"


def _demo_config() -> dict:
    return load_yaml(ROOT / "config.yaml")


def test_relative_weights_are_found_in_the_workflow_folder(tmp_path):
    config = check_config(_demo_config(), tmp_path, resource_dirs=[ROOT])
    assert Path(config["model"]["weights"]) == (ROOT / SHIPPED).resolve()


def test_missing_shipped_weights_fall_back_to_scratch_with_a_warning(tmp_path, capsys):
    config = check_config(_demo_config(), tmp_path)  # neither here nor in a resource folder
    assert config["model"]["weights"] is None
    assert f"model/weights: file {SHIPPED!r} does not exist; training the 'tiny' preset from scratch" in (
        capsys.readouterr().err
    )


def test_missing_weights_are_an_error_unless_told_otherwise(tmp_path):
    config = _demo_config()
    del config["model"]["missing_weights"]
    with pytest.raises(ConfigError, match=f"model/weights: file {SHIPPED!r} does not exist"):
        check_config(config, tmp_path)
    config["model"]["missing_weights"] = "maybe"
    with pytest.raises(ConfigError, match="missing_weights"):
        check_config(config, tmp_path)


def test_weights_a_user_names_must_exist(tmp_path):
    from fewseg.config import adapt_defaults

    config = _demo_config()
    own = {"model": {"weights": "my/seggpt.pth"}}
    config["model"]["weights"] = "my/seggpt.pth"
    adapted = adapt_defaults(config, own)
    assert adapted["model"]["missing_weights"] == "error" and config["model"]["missing_weights"] == "scratch"
    with pytest.raises(ConfigError, match="model/weights: file 'my/seggpt.pth' does not exist"):
        check_config(adapted, tmp_path)
    # unless the user's own files allow the fallback, or do not touch the weights at all
    allowed = {"model": {"weights": "my/seggpt.pth", "missing_weights": "scratch"}}
    assert adapt_defaults(config, allowed)["model"]["missing_weights"] == "scratch"
    assert adapt_defaults(_demo_config(), {"seed": 3})["model"]["missing_weights"] == "scratch"
