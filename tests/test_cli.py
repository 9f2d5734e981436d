"""The fewseg command: every subcommand's help, scoring with known numbers and its errors, config checks, weight
conversion and a short pretraining run."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewseg.checkpoints import load_base_model
from fewseg.cli import deep_merge, main
from fewseg.io import write_geotiff, write_png
from fewseg.model import build_model
from fewseg.weights import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
TEST_CONFIG = ROOT / "tests" / "config.test.yaml"
COMMANDS = ("convert-weights", "pretrain", "score", "check-config")


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread for tiny models


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _png_bytes(tmp_path: Path, ids) -> bytes:
    path = tmp_path / "scratch.png"
    write_png(path, np.asarray(ids, dtype=np.uint8))
    return path.read_bytes()


# --- help and usage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fewseg {command}")


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["score", "only-one-argument.zip"]) == 2
    assert "usage: fewseg" in capsys.readouterr().err


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fewseg", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(c in r.stdout for c in COMMANDS)


# --- score -----------------------------------------------------------------------------------------------------


@pytest.fixture
def scored(tmp_path):
    """Two query tiles with hand-counted IoUs: class 1 3/5, class 2 1/2, class 8 2/3; class 3 only on ignored px."""
    labels = tmp_path / "labels"
    labels.mkdir()
    write_geotiff(labels / "q1.tif", np.array([[1, 1, 1, 1], [8, 8, 0, 0]], dtype=np.uint8))
    write_png(labels / "q2.png", np.array([[2, 2, 255, 255]], dtype=np.uint8))
    members = {
        "q1.png": _png_bytes(tmp_path, [[1, 1, 1, 8], [8, 8, 0, 0]]),
        "q2.png": _png_bytes(tmp_path, [[2, 1, 3, 3]]),
    }
    return _zip(tmp_path / "submission.zip", members), labels


def test_score_reports_the_challenge_metric(scored, tmp_path, capsys):
    submission, labels = scored
    out = tmp_path / "metrics.json"
    assert main(["score", str(submission), str(labels), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    iou = {c: row["iou"] for c, row in summary["per_class"].items()}
    assert iou["1"] == pytest.approx(3 / 5) and iou["2"] == pytest.approx(1 / 2) and iou["8"] == pytest.approx(2 / 3)
    assert iou["3"] is None and iou["9"] is None  # predicted only where the truth is ignored
    assert summary["base_miou"] == pytest.approx(0.55)
    assert summary["novel_miou"] == pytest.approx(2 / 3)
    assert summary["score"] == pytest.approx(0.4 * 0.55 + 0.6 * 2 / 3)
    assert summary["queries"] == 2
    printed = capsys.readouterr().out
    assert "score (0.4 base + 0.6 novel) 0.6200" in printed and "vehicle" in printed


def test_score_takes_class_sets_from_the_config(scored, tmp_path):
    submission, labels = scored
    config = tmp_path / "classes.yaml"
    config.write_text("classes: {base: [1, 2, 3, 4, 5, 6, 7, 8], novel: [9, 10, 11]}\noverlay: {order: [9, 11, 10]}\n")
    out = tmp_path / "metrics.json"
    # Layered over the defaults, class 8 moved to the base classes still has novel-class settings: refused...
    assert main(["score", str(submission), str(labels), "--config", str(config), "--json", str(out)]) == 1
    assert not out.exists()
    # ...and a complete config with class 8 as a base class scores it as one.
    full = yaml.safe_load(TEST_CONFIG.read_text())
    full["classes"]["base"].append(8)
    full["classes"]["novel"].remove(8)
    full["classes"]["palette"].append([10, 20, 30])
    full["overlay"]["order"].remove(8)
    for section in (full["mapping"]["novel_filter"]["thresholds"], full["prompt_training"]["classes"],
                    full["inference"]["novel"], full["overlay"]["background_check"]):  # fmt: skip
        section.pop(8)
    config.write_text(yaml.safe_dump(full))
    args = ["score", str(submission), str(labels), "--config", str(config), "--no-defaults", "--json", str(out)]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    assert summary["base_miou"] == pytest.approx((3 / 5 + 1 / 2 + 2 / 3) / 3)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_label", "q3.png: no label q3"),
        ("size", "prediction is 1x3 px"),
        ("bad_zip", "not a zip file"),
        ("unmatched_label", "q2.png: no prediction q2.png"),
        ("not_png", "expected <query stem>.png"),
        ("broken_png", "not a readable PNG"),
        ("class_range", "class id 12 is beyond the last class 11"),
    ],
)
def test_score_errors_name_the_file(scored, tmp_path, capsys, case, message):
    submission, labels = scored
    good = {name: zipfile.ZipFile(submission).read(name) for name in ("q1.png", "q2.png")}
    if case == "missing_label":
        submission = _zip(tmp_path / "s.zip", {**good, "q3.png": good["q2.png"]})
    elif case == "size":
        submission = _zip(tmp_path / "s.zip", {**good, "q2.png": _png_bytes(tmp_path, [[2, 2, 2]])})
    elif case == "bad_zip":
        submission = tmp_path / "s.zip"
        submission.write_bytes(b"PK but not really a zip")
    elif case == "unmatched_label":
        submission = _zip(tmp_path / "s.zip", {"q1.png": good["q1.png"]})
    elif case == "not_png":
        submission = _zip(tmp_path / "s.zip", {**good, "notes.txt": b"hello"})
    elif case == "broken_png":
        submission = _zip(tmp_path / "s.zip", {**good, "q2.png": b"\x89PNG broken"})
    elif case == "class_range":
        submission = _zip(tmp_path / "s.zip", {**good, "q2.png": _png_bytes(tmp_path, [[12, 2, 2, 2]])})
    assert main(["score", str(submission), str(labels)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewseg score: error: ") and message in err and "\n" not in err
    assert "Traceback" not in err
    if case in ("missing_label", "size", "not_png", "broken_png", "class_range", "bad_zip"):
        assert str(submission) in err
    if case == "unmatched_label":
        assert str(labels / "q2.png") in err


def test_score_missing_labels_folder(scored, tmp_path, capsys):
    submission, _ = scored
    assert main(["score", str(submission), str(tmp_path / "nowhere")]) == 1
    assert "nowhere: labels folder not found" in capsys.readouterr().err


# --- check-config ----------------------------------------------------------------------------------------------


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": {"p": 1}}, "b": [1, 2], "c": 1}
    merged = deep_merge(base, {"a": {"y": {"q": 2}}, "b": [3]})
    assert merged == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": [3], "c": 1}
    assert base["a"]["y"] == {"p": 1}  # the base is left as it was


def test_check_config_good(tmp_path, capsys):
    layer = tmp_path / "seed.yaml"
    layer.write_text("seed: 3\nbase_training: {steps: 10}\n")
    assert main(["check-config", str(layer)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    assert main(["check-config", "--no-defaults", "--no-paths", str(TEST_CONFIG)]) == 0
    assert main(["check-config", str(ROOT / "config.yaml"), str(TEST_CONFIG)]) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("overlay: {order: [9, 11, 10, 99]}\n", "overlay/order: [99] are not novel classes"),
        ("base_training: {stepz: 10}\n", "stepz"),
        ("pretraining: {classes: [1, 8]}\n", "pretraining/classes"),
        ("model: {weights: no/such/file.pth}\n", "model/weights: file 'no/such/file.pth' does not exist"),
        ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("- a list\n", "must hold a mapping"),
        ("overlay: {background_check: {10: sometimes}}\n", "overlay/background_check/10"),
        ("overlay: {min_background_share: 1.5}\n", "overlay/min_background_share"),
    ],
)
def test_check_config_bad(tmp_path, capsys, text, message):
    layer = tmp_path / "bad.yaml"
    layer.write_text(text)
    assert main(["check-config", str(layer)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_check_config_alone_needs_a_complete_file(tmp_path, capsys):
    layer = tmp_path / "partial.yaml"
    layer.write_text("seed: 3\n")
    assert main(["check-config", "--no-defaults", str(layer)]) == 1
    assert "required property" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml: config file not found" in capsys.readouterr().err


# --- convert-weights -------------------------------------------------------------------------------------------


def test_convert_weights_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("micro")
    src = tmp_path / "micro.pth"
    torch.save(model.state_dict(), src)
    hf, painter, back = tmp_path / "hf.safetensors", tmp_path / "painter.pth", tmp_path / "back.pth"
    assert main(["convert-weights", str(src), str(hf), "--to", "hf"]) == 0
    assert main(["convert-weights", str(hf), str(painter), "--to", "painter"]) == 0
    assert main(["convert-weights", str(painter), str(back), "--to", "fewseg"]) == 0
    assert "(painter) ->" in capsys.readouterr().out
    assert set(torch.load(painter, weights_only=True)) == {"model"}
    loaded = load_pretrained(back, config=model.config)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_convert_weights_bad_input(tmp_path, capsys):
    assert main(["convert-weights", str(tmp_path / "absent.pth"), str(tmp_path / "out.pth")]) == 1
    assert "absent.pth" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, junk)
    assert main(["convert-weights", str(junk), str(tmp_path / "out.pth"), "--to", "hf"]) == 1
    assert "junk.pth" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()
    assert main(["convert-weights", str(junk), str(tmp_path / "out.pth"), "--to", "onnx"]) == 2


# --- pretrain --------------------------------------------------------------------------------------------------


def _pretrain_config(tmp_path: Path, **changes) -> Path:
    settings = {"preset": "micro", "steps": 3, "batch_size": 2, "warmup_steps": 1, "working_size": 64,
                "classes": [2, 3], "val_episodes": 2, "val_every": 2, "checkpoint_every": 2, **changes}  # fmt: skip
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump({"pretraining": settings, "runtime": {"device": "cpu"}}))
    return path


def test_pretrain_a_couple_of_steps(tmp_path, capsys):
    config = _pretrain_config(tmp_path)
    out = tmp_path / "out"
    assert main(["pretrain", "--config", str(config), "--out", str(out), "--steps", "2", "--fp16"]) == 0
    model, meta = load_base_model(out / "model.pt")
    assert model.config.depth == 3 and meta["steps"] == 2 and meta["dtype"] == "float16"
    assert len((out / "history.csv").read_text().splitlines()) == 3
    assert (out / "history.png").is_file() and not (out / "checkpoints" / "resume.pt").exists()
    assert meta["fingerprint"] in capsys.readouterr().out


def test_pretrain_bad_settings(tmp_path, capsys):
    config = _pretrain_config(tmp_path, warmup_steps=5)
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "warmup_steps 5 must be below pretraining/steps 3" in err and "Traceback" not in err
    assert main(["pretrain", "--config", str(_pretrain_config(tmp_path, preset="huge"))]) == 1
    assert "pretraining/preset" in capsys.readouterr().err


def test_check_config_takes_a_one_class_file_as_the_workflow_does(tmp_path, capsys):
    from test_class_sets import one_novel_class

    from fewseg.config import load_yaml

    user = one_novel_class(load_yaml(Path(__file__).resolve().parent.parent / "config.yaml"))
    path = tmp_path / "one-class.yaml"
    path.write_text(yaml.safe_dump(user))
    assert main(["check-config", "--no-paths", str(path)]) == 0
