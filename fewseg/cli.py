"""The ``fewseg`` command: the library's entry points outside Snakemake.

``fewseg convert-weights`` converts SegGPT checkpoints, ``fewseg pretrain`` runs the in-context pretraining recipe,
``fewseg score`` scores a submission zip with the challenge metric and ``fewseg check-config`` checks config files
layered as ``snakemake --configfile`` layers them. Bad input ends with one line naming the file and exit status 1;
usage errors exit with 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewseg.config import PACKAGE_DIR, ConfigError, adapt_defaults, check_config, load_yaml
from fewseg.errors import WeightsError
from fewseg.io import IMAGE_SUFFIXES, InputError

DEFAULT_CONFIG = PACKAGE_DIR.parent / "config.yaml"
LABEL_SUFFIXES = (*IMAGE_SUFFIXES, ".png")


class CommandError(ValueError):
    """Bad input to a command: reported as one message, never as a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Configs


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, mappings merged key by key, anything else replaced (as Snakemake does)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def layered_config(files: Sequence[str | Path], defaults: bool = True) -> dict:
    """The config a workflow run would see: the repository's config.yaml, then each file over it, in order."""
    layers = [DEFAULT_CONFIG] if defaults else []
    layers += [Path(f) for f in files]
    if not layers:
        raise CommandError("no config file given (and --no-defaults leaves none)")
    if defaults and not DEFAULT_CONFIG.is_file():
        raise CommandError(f"{DEFAULT_CONFIG}: default config not found; pass --no-defaults and a complete config")
    config: dict = {}
    overrides: dict = {}
    for n, path in enumerate(layers):
        layer = load_yaml(path)
        if not isinstance(layer, dict):
            raise CommandError(f"{path}: a config file must hold a mapping of settings")
        config = deep_merge(config, layer)
        if n or not defaults:
            overrides = deep_merge(overrides, layer)
    # as the workflow does: config.yaml's entries for classes the given files do not configure are dropped, and
    # weights the files name must exist
    return adapt_defaults(config, overrides) if defaults else config


def _checked_config(files: Sequence[str], defaults: bool, check_paths: bool) -> dict:
    return check_config(
        layered_config(files, defaults), Path.cwd(), check_paths=check_paths, resource_dirs=[PACKAGE_DIR.parent]
    )


# ---------------------------------------------------------------------------------------------------------------
# Commands


def cmd_convert_weights(args: argparse.Namespace) -> int:
    from fewseg.weights import convert_main

    return convert_main([str(args.input), str(args.output), "--to", args.to])


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fewseg.config import pretraining_settings

    config = _checked_config(args.config, not args.no_defaults, check_paths=False)
    settings = pretraining_settings(config)
    p = settings["pretraining"]
    if args.steps is not None:
        p["steps"] = args.steps
    if args.fp16:
        p["fp16"] = True
    if args.device is not None:
        settings["runtime"]["device"] = args.device
    import torch

    from fewseg.pretrain import pretrain
    from fewseg.runtime import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pick_device(settings["runtime"]["device"])
    except RuntimeError as err:
        raise CommandError(str(err)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
    result = pretrain(
        out / "model.pt", out / "history.csv", out / "history.png", ckpt, settings, progress_stream=sys.stderr
    )
    print(f"{out / 'model.pt'}: fingerprint {result['fingerprint']}, held-out mIoU {result['final_val_miou']}")
    return 0


def _read_png_label(data: bytes, where: str):
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "P"):
                raise CommandError(f"{where}: expected a single-band 8-bit PNG of class ids, found mode {im.mode}")
            return np.asarray(im).copy()
    except CommandError:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise CommandError(f"{where}: not a readable PNG ({err})") from None


def _label_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise CommandError(f"{folder}: labels folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in LABEL_SUFFIXES or path.name.startswith("."):
            continue
        if path.stem in found:
            raise CommandError(f"{path}: a second label for {path.stem!r} (also {found[path.stem].name})")
        found[path.stem] = path
    if not found:
        raise CommandError(f"{folder}: no label GeoTIFFs or PNGs")
    return found


def score_submission(zip_path: str | Path, labels_dir: str | Path, settings: dict) -> dict:
    """The challenge metric of a submission zip against a folder of labels (``evaluation_settings`` slice).

    Every zip member must be ``<stem>.png`` with a label ``<stem>.tif|.tiff|.png`` of the same size, and every
    label must have its prediction: a partial submission would score the wrong query set.
    """
    from fewseg.io import read_label
    from fewseg.metrics import ConfusionMatrix, summarize

    zip_path, labels_dir = Path(zip_path), Path(labels_dir)
    labels = _label_files(labels_dir)
    num = max([*settings["base"], *settings["novel"]]) + 1
    cm = ConfusionMatrix(num, settings["ignore_index"])
    if not zip_path.is_file():
        raise CommandError(f"{zip_path}: submission not found")
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise CommandError(f"{zip_path}: not a zip file") from None
    seen = set()
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if not members:
            raise CommandError(f"{zip_path}: the zip holds no prediction")
        for member in members:
            where = f"{zip_path}:{member.filename}"
            name = Path(member.filename)
            if name.suffix.lower() != ".png" or len(name.parts) != 1:
                raise CommandError(f"{where}: expected <query stem>.png at the top level of the zip")
            if name.stem not in labels:
                raise CommandError(f"{where}: no label {name.stem}.tif or .png in {labels_dir}")
            try:
                data = zf.read(member)
            except (zipfile.BadZipFile, OSError) as err:
                raise CommandError(f"{where}: cannot be read from the zip ({err})") from None
            pred = _read_png_label(data, where)
            truth = read_label(labels[name.stem])
            if pred.shape != truth.shape:
                raise CommandError(
                    f"{where}: prediction is {pred.shape[0]}x{pred.shape[1]} px, its label {labels[name.stem]} is "
                    f"{truth.shape[0]}x{truth.shape[1]} px"
                )
            if pred.size and int(pred.max()) >= num:
                raise CommandError(f"{where}: class id {int(pred.max())} is beyond the last class {num - 1}")
            try:
                cm.update(pred, truth)
            except ValueError:
                raise CommandError(f"{labels[name.stem]}: class ids beyond the last class {num - 1}") from None
            seen.add(name.stem)
    unmatched = sorted(set(labels) - seen)
    if unmatched:
        first = unmatched[0]
        raise CommandError(f"{labels[first]}: no prediction {first}.png in {zip_path} ({len(unmatched)} unmatched)")
    summary = summarize(cm, settings["base"], settings["novel"], settings["names"])
    summary["queries"] = len(seen)
    return summary


def cmd_score(args: argparse.Namespace) -> int:
    from fewseg.config import evaluation_settings
    from fewseg.io import write_json
    from fewseg.metrics import format_table

    config = _checked_config(args.config, not args.no_defaults, check_paths=False)
    summary = score_submission(args.submission, args.labels, evaluation_settings(config))
    print(f"{args.submission}: {summary['queries']} query tiles")
    print(format_table(summary))
    if args.json:
        write_json(args.json, summary)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    layers = ([] if args.no_defaults else [str(DEFAULT_CONFIG)]) + list(args.files)
    try:
        _checked_config(args.files, not args.no_defaults, check_paths=not args.no_paths)
    except ConfigError as err:
        print(f"{' + '.join(layers)}: problems:\n{err}", file=sys.stderr)
        return 1
    print(f"OK: {' + '.join(layers)}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parser


def _add_config_options(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help=help_text)
    parser.add_argument(
        "--no-defaults", action="store_true", help=f"do not start from the repository's {DEFAULT_CONFIG.name}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewseg",
        description="Few-shot land-cover segmentation with learnable-prompt SegGPT. The workflow itself runs with "
        "`snakemake`; these commands are its pieces that are useful on their own.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert-weights",
        help="convert a SegGPT checkpoint between layouts",
        description="Convert a SegGPT checkpoint (BAAI's .pth, the transformers port, or a fewseg file) between the "
        "fewseg, Painter and Hugging Face layouts (same as `python -m fewseg.weights`).",
    )
    p.add_argument("input", type=Path, metavar="IN", help="checkpoint (.pth/.pt/.bin or .safetensors), any layout")
    p.add_argument("output", type=Path, metavar="OUT", help="output file; .safetensors or a torch pickle by suffix")
    p.add_argument("--to", choices=("painter", "hf", "fewseg"), default="fewseg", help="output layout")
    p.set_defaults(func=cmd_convert_weights)

    p = sub.add_parser(
        "pretrain",
        help="in-context pretraining of a model preset on synthetic scenes",
        description="Run the in-context pretraining recipe (config section `pretraining:`) outside Snakemake. "
        "Writes OUT/model.pt (usable as model.weights), OUT/history.csv and OUT/history.png; a rerun with the "
        "same settings resumes from the last checkpoint.",
    )
    _add_config_options(p, "config file layered over the defaults (repeatable, later files win)")
    p.add_argument("--out", default="results/pretrain", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, metavar="N", help="override pretraining/steps")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override runtime/device")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    p.add_argument("--fp16", action="store_true", help="store the weights as fp16 (half the file)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="resume state (default: OUT/checkpoints)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "score",
        help="score a submission zip with the challenge metric",
        description="Score a submission zip (<stem>.png class ids per query tile) against a folder of label "
        "GeoTIFFs or PNGs: IoU per class over all tiles, base and novel mIoU, and 0.4 base + 0.6 novel. Class "
        "sets, names and the ignored label value come from the config.",
    )
    p.add_argument("submission", type=Path, metavar="SUBMISSION.zip")
    p.add_argument("labels", type=Path, metavar="LABELS_DIR", help="folder with <stem>.tif (or .png) per query tile")
    _add_config_options(p, "config file layered over the defaults, for the class sets (repeatable)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the figures as JSON")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "check-config",
        help="check config files as the workflow would",
        description="Check config files layered over the repository's config.yaml, as `snakemake --configfile` "
        "layers them: the schema, cross-field checks and the paths they name (relative to this folder).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="config files, later ones over earlier ones")
    p.add_argument(
        "--no-defaults", action="store_true", help=f"check the files alone, without {DEFAULT_CONFIG.name} under them"
    )
    p.add_argument("--no-paths", action="store_true", help="do not check that dataset and weight paths exist")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2)
        return int(exit_.code or 0)
    try:
        return int(args.func(args))
    except (CommandError, InputError, ConfigError, WeightsError, OSError) as err:  # a bug keeps its traceback
        print(f"fewseg {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: Any) -> str:
    """Multi-line messages (a schema's list of problems) joined into one line."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    raise SystemExit(main())
