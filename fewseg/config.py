"""Configuration: load, validate against the schema, check what a schema cannot, and cut per-stage slices.

The workflow hands each rule only its own slice of the config (see the ``*_settings`` functions), so that editing
one setting reruns exactly the jobs it affects.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from fewseg.errors import ConfigError
from fewseg.imports import closure, entry_closures, import_graph

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = PACKAGE_DIR / "schemas" / "config.schema.yaml"


class _StrictLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike) -> Any:
    """Load YAML, naming the file in any error and refusing duplicate keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with path.open() as fh:
            return yaml.load(fh, Loader=_StrictLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def load_schema() -> dict:
    text = resources.files("fewseg").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(top level)"


# YAML 1.1 (PyYAML, and so Snakemake) reads 1e-3 as a string: it wants a dot in the mantissa (1.0e-3).
# People write both, so a string that YAML 1.2 would read as a number is taken as one where the schema wants one.
_YAML12_NUMBER = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


def _as_number(text: str, integer: bool) -> float | int | None:
    if not _YAML12_NUMBER.match(text.strip()):
        return None
    value = float(text)
    if integer:
        return int(value) if value.is_integer() else None
    return value


def _type_errors(errors) -> list[jsonschema.ValidationError]:
    """Type errors, including those nested under anyOf/oneOf."""
    out = []
    for error in errors:
        if error.validator == "type":
            out.append(error)
        out.extend(_type_errors(error.context or []))
    return out


def coerce_numbers(config: dict) -> tuple[dict, list[str]]:
    """Copy of ``config`` with numbers written as YAML 1.1 strings (``1e-3``) turned into numbers where the schema
    wants a number; also returns where that happened, for the log."""
    config = copy.deepcopy(config)
    validator = jsonschema.Draft202012Validator(load_schema())
    fixed: list[str] = []
    for error in _type_errors(validator.iter_errors(config)):
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        if not isinstance(error.instance, str) or not {"number", "integer"} & set(wanted):
            continue
        value = _as_number(error.instance, integer="number" not in wanted)
        path = list(error.absolute_path)
        if value is None or not path:
            continue
        node = config
        for key in path[:-1]:
            node = node[key]
        if node[path[-1]] == error.instance:
            node[path[-1]] = value
            fixed.append(f"{_where(error)}: {error.instance!r} read as {value!r}")
    return config, fixed


def _hint(error: jsonschema.ValidationError) -> str:
    """The fix for the type mistakes YAML invites."""
    if error.validator != "type":
        return ""
    wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    if isinstance(error.instance, str) and "number" in wanted:
        return " (write a plain number without quotes, e.g. 0.001, 1.0e-3 or 1e-3)"
    if isinstance(error.instance, str) and "integer" in wanted:
        return " (write a whole number without quotes, e.g. 300 or 3e2)"
    if isinstance(error.instance, bool) and "string" in wanted:
        return " (YAML reads yes/no/on/off/true/false as booleans: put the text in quotes)"
    return ""


def validate_schema(config: dict) -> None:
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"  - {_where(e)}: {e.message}{_hint(e)}" for e in errors[:10]]
        raise ConfigError("config does not match the schema:\n" + "\n".join(lines))


def _int_keys(mapping: dict, where: str) -> dict[int, Any]:
    out = {}
    for key, value in mapping.items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: key {key!r} is not a class id") from None
        if int(key) in out and str(key) != str(int(key)):
            raise ConfigError(f"{where}: class id {key!r} given twice")
    return out


def normalize(config: dict) -> dict:
    """Return a copy whose class-keyed mappings have int keys (YAML and ``--config`` may give strings)."""
    config = copy.deepcopy(config)
    config["classes"]["names"] = _int_keys(config["classes"]["names"], "classes/names")
    config["mapping"]["novel_filter"]["thresholds"] = _int_keys(
        config["mapping"]["novel_filter"]["thresholds"], "mapping/novel_filter/thresholds"
    )
    config["prompt_training"]["classes"] = _int_keys(config["prompt_training"]["classes"], "prompt_training/classes")
    config["inference"]["novel"] = _int_keys(config["inference"]["novel"], "inference/novel")
    config["overlay"]["background_check"] = _int_keys(config["overlay"]["background_check"], "overlay/background_check")
    return config


def _check_classes(config: dict) -> None:
    classes = config["classes"]
    names, base, novel = classes["names"], classes["base"], classes["novel"]
    for label, ids in (("classes/base", base), ("classes/novel", novel)):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ConfigError(f"{label}: duplicate class ids {dup}")
    both = sorted(set(base) & set(novel))
    if both:
        raise ConfigError(f"classes: ids {both} are listed as both base and novel")
    if 0 not in names:
        raise ConfigError("classes/names: class 0 (background) needs a name")
    unnamed = sorted((set(base) | set(novel)) - set(names))
    if unnamed:
        raise ConfigError(f"classes/names: classes {unnamed} have no name")
    extra = sorted(set(names) - set(base) - set(novel) - {0})
    if extra:
        raise ConfigError(f"classes/names: ids {extra} are neither base nor novel classes")
    if max(base) + 1 > len(classes["palette"]):
        raise ConfigError(
            f"classes/palette: {len(classes['palette'])} colours, but base class ids go up to {max(base)}"
        )
    colours = [tuple(c) for c in classes["palette"]]
    if len(set(colours)) != len(colours):
        raise ConfigError("classes/palette: two classes share a colour, so predictions could not be decoded")
    if config["dataset"]["ignore_index"] in set(base) | set(novel) | {0}:
        raise ConfigError("dataset/ignore_index: collides with a class id")


def _check_novel_maps(config: dict) -> None:
    novel = set(config["classes"]["novel"])
    order = config["overlay"]["order"]
    unknown = [c for c in order if c not in novel]
    if unknown:
        raise ConfigError(f"overlay/order: {unknown} are not novel classes (novel: {sorted(novel)})")
    dup = sorted({c for c in order if order.count(c) > 1})
    if dup:
        raise ConfigError(f"overlay/order: classes {dup} appear more than once")
    per_class = {
        "prompt_training/classes": config["prompt_training"]["classes"],
        "inference/novel": config["inference"]["novel"],
        "overlay/background_check": config["overlay"]["background_check"],
    }
    if config["mapping"]["novel_filter"]["enabled"]:
        per_class["mapping/novel_filter/thresholds"] = config["mapping"]["novel_filter"]["thresholds"]
    for where, mapping in per_class.items():
        stray = sorted(set(mapping) - novel)
        if stray:
            raise ConfigError(f"{where}: {stray} are not novel classes (novel: {sorted(novel)})")
        missing = sorted(set(order) - set(mapping))
        if missing:
            raise ConfigError(f"{where}: no settings for novel classes {missing}")
    for cls, crops in config["prompt_training"]["classes"].items():
        if crops["max_crop_size"] < crops["crop_size"]:
            raise ConfigError(f"prompt_training/classes/{cls}: max_crop_size is smaller than crop_size")
        if crops["crop_size"] > config["prompt_training"]["working_size"]:
            raise ConfigError(f"prompt_training/classes/{cls}: crop_size exceeds prompt_training/working_size")
    for cls, (low, high) in config["mapping"]["novel_filter"]["thresholds"].items():
        if low > high:
            raise ConfigError(f"mapping/novel_filter/thresholds/{cls}: low {low} is above high {high}")
    if config["inference"]["top_k"] > config["mapping"]["top_n"]:
        raise ConfigError("inference/top_k: larger than mapping/top_n, the number of prompts ranked")


def _check_model(config: dict) -> None:
    from fewseg.model_config import PRESETS, SegGPTConfig

    overrides = config["model"].get("overrides") or {}
    fields = set(SegGPTConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"model/overrides: unknown model settings {unknown} (known: {sorted(fields)})")
    if config["model"]["preset"] not in PRESETS:
        raise ConfigError(f"model/preset: unknown preset {config['model']['preset']!r}")
    try:
        dataclasses.replace(PRESETS[config["model"]["preset"]], **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model/overrides: {err}") from None


def _resolve(value: str, base: Path) -> Path:
    return Path(value) if Path(value).is_absolute() else base / value


def _resolve_weights(config: dict, base: Path, resource_dirs: Sequence[str | os.PathLike]) -> None:
    """A relative model/weights path is looked up in the working directory, then in ``resource_dirs`` (the
    workflow's own folder, which ships resources/pretrain); a file found only there is used by its full path."""
    weights = config["model"]["weights"]
    if not weights or _resolve(weights, base).is_file():
        return
    if not Path(weights).is_absolute():
        for folder in resource_dirs:
            if (Path(folder) / weights).is_file():
                config["model"]["weights"] = str((Path(folder) / weights).resolve())
                return
    if config["model"].get("missing_weights") == "scratch":
        # The demo's shipped weights are optional: without them it trains the preset from scratch, and says so.
        print(
            f"fewseg warning: model/weights: file {weights!r} does not exist; training the "
            f"{config['model']['preset']!r} preset from scratch (model/missing_weights: scratch)",
            file=sys.stderr,
        )
        config["model"]["weights"] = None


def _check_paths(config: dict, base: Path, resource_dirs: Sequence[str | os.PathLike] = ()) -> None:
    def must_exist(value: str | None, where: str, kind: str = "file") -> None:
        if value is None:
            return
        path = _resolve(value, base)
        ok = path.is_dir() if kind == "folder" else path.is_file()
        if not ok:
            raise ConfigError(f"{where}: {kind} {value!r} does not exist")

    _resolve_weights(config, base, resource_dirs)
    must_exist(config["model"]["weights"], "model/weights")
    must_exist(config["mapping"]["weights"], "mapping/weights")
    must_exist(config["dataset"]["split_lists"], "dataset/split_lists")
    dataset = config["dataset"]
    if dataset["source"] == "folder":
        if not dataset["root"]:
            raise ConfigError("dataset/root: required when dataset/source is 'folder'")
        must_exist(dataset["root"], "dataset/root", "folder")
        root = Path(dataset["root"])
        must_exist(str(root / dataset["train_dir"]), "dataset/train_dir", "folder")
        must_exist(str(root / dataset["test_dir"]), "dataset/test_dir", "folder")
        if dataset["query_labels"]:
            must_exist(str(query_labels_dir(config)), "dataset/query_labels", "folder")


# Maps keyed by class id, and which ids they may hold: every class (names) or the novel classes.
CLASS_MAPS: dict[tuple[str, ...], str] = {
    ("classes", "names"): "all",
    ("mapping", "novel_filter", "thresholds"): "novel",
    ("prompt_training", "classes"): "novel",
    ("inference", "novel"): "novel",
    ("overlay", "background_check"): "novel",
}


def _node(config: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def adapt_defaults(config: dict, overrides: dict) -> dict:
    """config.yaml's defaults that must not carry over to a user's own settings: the entries of classes the user's
    files do not configure (:func:`drop_default_classes`), and the demo's permission to train from scratch when
    its weights are missing: weights a user names must exist (``model.missing_weights: error`` unless they say)."""
    config = drop_default_classes(config, overrides)
    own_model = overrides.get("model") if isinstance(overrides, dict) else None
    if isinstance(own_model, dict) and "weights" in own_model and "missing_weights" not in own_model:
        if isinstance(config.get("model"), dict):
            config = {**config, "model": {**config["model"], "missing_weights": "error"}}
    return config


def drop_default_classes(config: dict, overrides: dict) -> dict:
    """Drop, from the class-keyed maps, the entries of classes that are not configured and that only the defaults
    (config.yaml) name.

    Snakemake lays ``--configfile``/``--config`` over config.yaml key by key, so a user's file with other classes
    than the defaults' 8-11 would still carry config.yaml's settings for 8-11. Entries the user's own files write
    are kept, so a class id misspelt there is still reported by the checks.
    """
    if not overrides:
        return config
    config = copy.deepcopy(config)
    classes = config.get("classes", {})
    try:
        novel = {int(c) for c in classes.get("novel", [])}
        every = {0} | {int(c) for c in classes.get("base", [])} | novel
    except (TypeError, ValueError):
        return config  # the schema check reports it
    for path, kind in CLASS_MAPS.items():
        mapping, written = _node(config, path), _node(overrides, path) or {}
        if not isinstance(mapping, dict):
            continue
        allowed = every if kind == "all" else novel
        user_ids = {str(k) for k in written} if isinstance(written, dict) else set()
        for key in list(mapping):
            if str(key) in user_ids:
                continue
            try:
                configured = int(key) in allowed
            except (TypeError, ValueError):
                continue
            if not configured:
                del mapping[key]
    return config


def check_config(
    config: dict,
    base_dir: str | os.PathLike = ".",
    check_paths: bool = True,
    resource_dirs: Sequence[str | os.PathLike] = (),
) -> dict:
    """Validate ``config`` (schema, then cross-field and path checks); return it with int class keys.

    ``resource_dirs``: where a relative model/weights path not found under ``base_dir`` is looked for next.

    Numbers that YAML 1.1 left as strings (``lr: 1e-3``) come back as numbers.
    """
    config, _ = coerce_numbers(config)
    validate_schema(config)
    config = normalize(config)
    _check_classes(config)
    _check_novel_maps(config)
    _check_model(config)
    if check_paths:
        _check_paths(config, Path(base_dir), resource_dirs)
    return config


def load_config(path: str | os.PathLike, base_dir: str | os.PathLike = ".", check_paths: bool = True) -> dict:
    """Load and check a config file; relative paths in it are taken from ``base_dir`` (the working directory)."""
    return check_config(load_yaml(path), base_dir, check_paths)


# ---------------------------------------------------------------------------------------------------------------
# Dataset locations

DEMO_ROOT = "results/demo"


def dataset_root(config: dict) -> str:
    return DEMO_ROOT if config["dataset"]["source"] == "demo" else str(config["dataset"]["root"])


def query_labels_dir(config: dict) -> str | None:
    folder = config["dataset"]["query_labels"]
    if folder is None:
        return None
    return folder if os.path.isabs(folder) else os.path.join(dataset_root(config), folder)


# ---------------------------------------------------------------------------------------------------------------
# Per-rule slices: what each stage reads, and nothing more.


def model_settings(config: dict) -> dict:
    return {"model": config["model"], "runtime": config["runtime"]}


def base_training_settings(config: dict) -> dict:
    return {
        **model_settings(config),
        "training": config["base_training"],
        "palette": config["classes"]["palette"],
        "base": config["classes"]["base"],
        "seed": config["seed"],
    }


def base_training_gpus(config: dict) -> int:
    """GPUs the base-training job asks the scheduler for: one per data-parallel process when on CUDA."""
    return config["base_training"]["processes"] if config["runtime"]["device"] == "cuda" else 0


def prompt_settings(config: dict, cls: int) -> dict:
    """Prompt-training settings of one class: the defaults with that class's overrides."""
    pt = config["prompt_training"]
    own = pt["classes"][int(cls)]
    shared = {k: v for k, v in pt.items() if k != "classes"}
    merged = {**shared, **{k: v for k, v in own.items() if k not in ("phase1", "phase2")}}
    for phase in ("phase1", "phase2"):
        merged[phase] = {**pt[phase], **own.get(phase, {})}
    return {
        "cls": int(cls),
        "name": config["classes"]["names"][int(cls)],
        "training": merged,
        "runtime": config["runtime"],
        "seed": config["seed"],
    }


def phase_settings(config: dict, cls: int, phase: int) -> dict:
    """The slice of :func:`prompt_settings` that one phase's job reads: the other phase's steps and rate left out,
    so that changing phase 2 does not rerun phase 1 (nor the reverse)."""
    s = prompt_settings(config, cls)
    other = "phase2" if int(phase) == 1 else "phase1"
    return {**s, "training": {k: v for k, v in s["training"].items() if k != other}}


# What choosing a class's support pair reads (fewseg.train.PairSettings): its crops' largest size, the held-out
# split and the candidates; not the strides, steps or learning rates of prompt training.
PAIR_KEYS = ("working_size", "crop_size", "max_crop_size", "holdout", "pair_candidates")


def pair_settings(config: dict, cls: int) -> dict:
    """The slice of :func:`prompt_settings` that ``select_support_pair`` reads, so other prompt settings do not
    rerun it."""
    s = prompt_settings(config, cls)
    return {**s, "training": {k: s["training"][k] for k in PAIR_KEYS}}


def mapping_settings(config: dict) -> dict:
    m = config["mapping"]
    return {k: m[k] for k in ("encoder", "weights", "pretrained", "image_size", "batch_size")} | {
        "seed": config["seed"]
    }


def ranking_settings(config: dict) -> dict:
    return {"top_n": config["mapping"]["top_n"], "novel_filter": config["mapping"]["novel_filter"]}


def base_inference_settings(config: dict) -> dict:
    inf = config["inference"]
    return {
        "working_size": inf["working_size"],
        "top_k": inf["top_k"],
        "batch_size": inf["batch_size"],
        "grid": inf["base"]["grid"],
        "seam_repair": inf["base"]["seam_repair"],
        "flips": inf["base"].get("flips", 1),
        "seam_band": inf["seam_band"],
        "palette": config["classes"]["palette"],
        "base": config["classes"]["base"],
        "runtime": config["runtime"],
    }


def novel_inference_settings(config: dict, cls: int) -> dict:
    inf = config["inference"]
    own = inf["novel"][int(cls)]
    return {
        "cls": int(cls),
        "working_size": inf["working_size"],
        "batch_size": inf["batch_size"],
        "grid": own["grid"],
        "seam_repair": own["seam_repair"],
        "flips": own.get("flips", 1),
        "seam_band": inf["seam_band"],
        "runtime": config["runtime"],
    }


def overlay_step_settings(config: dict, step: int) -> dict:
    order = config["overlay"]["order"]
    cls = order[int(step) - 1]
    flt = config["mapping"]["novel_filter"]
    check = config["overlay"]["background_check"][cls]
    settings = {
        "cls": cls,
        "background_check": check,
        "skip_nodata": config["overlay"]["skip_nodata"],
        "min_prompt_iou": config["overlay"]["min_prompt_iou"],
        "filter": flt["thresholds"][cls] if flt["enabled"] else None,
    }
    if check == "auto":  # only then does the threshold concern this step
        settings["min_background_share"] = config["overlay"]["min_background_share"]
    return settings


def background_settings(config: dict, cls: int) -> dict:
    """Measuring a class's background share on its support tiles: the base inference settings, and the class."""
    return {**base_inference_settings(config), "cls": int(cls)}


def background_measured(config: dict) -> list[int]:
    """Novel classes whose overlay step decides the background check from the support tiles ("auto")."""
    return [c for c in config["overlay"]["order"] if config["overlay"]["background_check"][c] == "auto"]


def evaluation_settings(config: dict) -> dict:
    classes = config["classes"]
    return {
        "names": {int(k): v for k, v in classes["names"].items()},
        "base": classes["base"],
        "novel": classes["novel"],
        "ignore_index": config["dataset"]["ignore_index"],
    }


def pretraining_settings(config: dict) -> dict:
    """In-context pretraining (fewseg.pretrain): its own section, plus the device to run on."""
    if "pretraining" not in config:
        raise ConfigError("pretraining: section missing (see config.yaml for its settings)")
    return {"pretraining": config["pretraining"], "runtime": config["runtime"]}


# The stages.py functions behind each kind of job; the modules they run are read from the import graph.
STAGE_ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "demo": ("make_demo_dataset",),
    "validate": ("validate_dataset",),
    "convert": ("convert_train_masks", "split_support"),
    "mapping": ("embed_tiles", "rank_prompts"),
    "train": ("train_base", "select_support_pair", "train_prompt"),
    "infer": ("infer_base", "infer_novel", "measure_background"),
    "overlay": ("overlay_step",),
    "submission": ("make_submission", "evaluate", "compare_prompts", "job_statistics"),
}
# Every job runs its stage through this one.
STAGE_RUNNER = "run_stage"
# Jobs whose stage function lives in a module of its own: all of that module runs.
MODULE_STAGES: dict[str, str] = {"pretrain": "pretrain"}


def stage_modules(package_dir: str | os.PathLike = PACKAGE_DIR) -> dict[str, list[str]]:
    """The fewseg modules each kind of job runs: the stages' functions and all that they import, transitively."""
    entries = {kind: (STAGE_RUNNER, *functions) for kind, functions in STAGE_ENTRY_POINTS.items()}
    entries["_runner"] = (STAGE_RUNNER,)
    found = entry_closures("stages", entries, package_dir)
    runner = found.pop("_runner")
    graph = import_graph(package_dir)
    for kind, module in MODULE_STAGES.items():
        found[kind] = runner | closure(graph, [module])
    return {kind: sorted(modules) for kind, modules in found.items()}


def source_digest(modules: Iterable[str], package_dir: str | os.PathLike = PACKAGE_DIR) -> str:
    """Digest of fewseg modules' source, so that a library change reruns the jobs that run that code."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        path = Path(package_dir) / f"{name}.py"
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_digests(package_dir: str | os.PathLike = PACKAGE_DIR) -> dict[str, str]:
    """Per kind of job, the digest of the modules it runs: a rule param, so editing one reruns those jobs."""
    return {kind: source_digest(modules, package_dir) for kind, modules in stage_modules(package_dir).items()}
