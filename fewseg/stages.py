"""One function per workflow rule: the glue between Snakemake's job description and the library.

Each stage takes the rule's ``input``, ``output`` and ``params`` (anything with attribute access, so tests call
these without Snakemake) and the number of threads. :func:`run_stage` sets up the job's log and turns bad input
into one readable error line and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fewseg.errors import ConfigError
from fewseg.io import InputError, atomic_dir, read_georef, read_image, read_json, read_label, write_geotiff, write_json
from fewseg.io import write_png as _write_png
from fewseg.runtime import LogStream as _LogStream

log = logging.getLogger("fewseg")

# Preview colours of the novel classes (the base classes use the configured palette).
NOVEL_PREVIEW = [(255, 128, 0), (128, 0, 255), (0, 128, 0), (128, 128, 128), (0, 128, 255), (255, 0, 128)]


# ---------------------------------------------------------------------------------------------------------------
# Running a stage


def run_stage(smk: Any, stage: Callable[..., Any]) -> None:
    """Run ``stage`` for a Snakemake job: log to its log file, set threads, exit 1 with one line on bad input.

    Only the project's own input errors (:class:`InputError` for data, :class:`ConfigError` for settings) read as
    one line; any other exception is a bug and keeps its traceback in the log and on stderr.
    """
    log_path = Path(smk.log[0]) if len(smk.log) else None
    handle = open(log_path, "a") if log_path else sys.stderr  # noqa: SIM115 - lives as long as the job
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=handle, force=True
    )
    from fewseg.allocator import keep_freed_memory

    log.info("%s", keep_freed_memory())
    threads = max(1, int(smk.threads))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when a stage imports it
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    t0 = time.time()
    try:
        stage(smk.input, smk.output, smk.params, progress=_LogStream(handle))
    except (InputError, ConfigError) as err:  # the user's data or settings; anything else is a bug: traceback
        message = f"{getattr(smk, 'rule', stage.__name__)}: {err}"
        log.error("%s", message)
        for line in message.splitlines():
            print(f"fewseg error: {line}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        log.error("failed:\n%s", traceback.format_exc())
        raise
    log.info("%s finished in %.1f s", stage.__name__, time.time() - t0)


def _param(params: Any, name: str) -> Any:
    return params[name] if isinstance(params, dict) else getattr(params, name)


# ---------------------------------------------------------------------------------------------------------------
# Data


def make_demo_dataset(input, output, params, progress=None) -> None:
    from fewseg.demo import make_demo_dataset as make

    demo = _param(params, "demo")
    manifest = make(output[0], seed=_param(params, "seed"), **demo)
    log.info("demo dataset written to %s: %s", output[0], json.dumps(manifest.get("counts", {})))


def validate_dataset(input, output, params, progress=None) -> None:
    """Every input file and the support split, checked before any heavy job (they all wait for this output)."""
    from fewseg.validate import DatasetSpec
    from fewseg.validate import validate_dataset as validate

    classes = {key: _param(params, key) for key in ("dataset", "base", "novel")}
    spec = DatasetSpec.from_settings(input.root, classes)
    summary = validate(spec, cache_path=_param(params, "cache"), max_listed=_param(params, "max_listed"))
    write_json(output[0], summary)
    log.info(
        "dataset is valid: %d train tiles, %d query tiles, support %s (%d files read, %d from the cache)",
        summary["train_tiles"], summary["query_tiles"], {c: len(s) for c, s in summary["support"].items()},
        summary["files_read"], summary["files_cached"],
    )  # fmt: skip


def convert_train_masks(input, output, params, progress=None) -> None:
    from fewseg.convert import convert_train
    from fewseg.palette import as_palette

    d = _param(params, "dataset")
    root = Path(input.root)
    index = convert_train(
        root / d["train_dir"] / "images",
        root / d["train_dir"] / "labels",
        output[0],
        palette=as_palette(_param(params, "palette")),
        base_ids=_param(params, "base"),
        ignore_index=d["ignore_index"],
    )
    log.info("train set: %d tiles converted to colour masks", len(index["tiles"]))


def split_support(input, output, params, progress=None) -> None:
    from fewseg.convert import split_support as split

    d = _param(params, "dataset")
    root = Path(input.root)
    train = read_json(Path(input.train) / "index.json")
    split_lists = read_json(d["split_lists"]) if d["split_lists"] else None
    result = split(
        root / d["test_dir"] / "images",
        root / d["test_dir"] / "labels",
        output[0],
        novel_ids=_param(params, "novel"),
        shots=d["shots"],
        ignore_index=d["ignore_index"],
        train_stems=[t["stem"] for t in train["tiles"]],
        train_images_dir=root / d["train_dir"] / "images",
        split_lists=split_lists,
    )
    counts = {c: len(s) for c, s in result["support"].items()}
    log.info("support tiles per class %s; %d query tiles", counts, len(result["queries"]))


def _train_tiles(train_dir: str | os.PathLike) -> list[dict]:
    index = read_json(Path(train_dir) / "index.json")
    return [{**t, "mask": str(Path(train_dir) / t["mask"])} for t in index["tiles"]]


def _queries(split_dir: str | os.PathLike) -> list[dict]:
    return read_json(Path(split_dir) / "query.json")["queries"]


def _support_tiles(split_dir: str | os.PathLike, cls: int) -> list[dict]:
    split_dir = Path(split_dir)
    stems = read_json(split_dir / "support.json")[str(cls)]
    return [
        {"stem": s, "image": str(split_dir / str(cls) / "images" / f"{s}.tif"),
         "label": str(split_dir / str(cls) / "labels" / f"{s}.png")}
        for s in stems
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Mapping


def embed_tiles(input, output, params, progress=None) -> None:
    from fewseg.mapping import build_encoder, embed_images, save_embeddings

    s = _param(params, "settings")
    subset = _param(params, "subset")
    if subset == "train":
        tiles = _train_tiles(input.tiles)
        stems, paths, classes = [t["stem"] for t in tiles], [t["image"] for t in tiles], [0] * len(tiles)
    elif subset == "query":
        queries = _queries(input.tiles)
        stems, paths, classes = [q["stem"] for q in queries], [q["image"] for q in queries], [0] * len(queries)
    else:
        support = read_json(Path(input.tiles) / "support.json")
        stems, paths, classes = [], [], []
        for cls in sorted(support, key=int):
            for tile in _support_tiles(input.tiles, int(cls)):
                stems.append(tile["stem"])
                paths.append(tile["image"])
                classes.append(int(cls))
    encoder = build_encoder(s["encoder"], weights=s["weights"], pretrained=s["pretrained"], seed=s["seed"])
    feats = embed_images(paths, encoder, s["image_size"], s["batch_size"])
    save_embeddings(output[0], stems, feats, {"classes": classes, "encoder": s["encoder"]})
    log.info("embedded %d %s tiles with %s (dim %d)", len(stems), subset, s["encoder"], feats.shape[1])


def rank_prompts(input, output, params, progress=None) -> None:
    from fewseg.mapping import build_mapping, load_embeddings

    s = _param(params, "settings")
    train_stems, train = load_embeddings(input.train)
    query_stems, query = load_embeddings(input.query)
    with np.load(input.support) as data:
        sup_stems, sup_feats, sup_cls = [str(x) for x in data["stems"]], data["features"], data["classes"]
    support = {
        int(c): ([st for st, k in zip(sup_stems, sup_cls, strict=True) if k == c], sup_feats[sup_cls == c])
        for c in np.unique(sup_cls)
    }
    mapping = build_mapping(
        query_stems, query, train_stems, train, support, top_n=s["top_n"], novel_filter=s["novel_filter"]
    )
    write_json(output[0], mapping)
    log.info("ranked %d train tiles for %d queries", len(train_stems), len(query_stems))


# ---------------------------------------------------------------------------------------------------------------
# Training


def train_base(input, output, params, progress=None) -> None:
    from fewseg.train import train_base as train

    settings = _param(params, "settings")
    job = {
        "tiles": _train_tiles(input.train), "out_model": output.model, "out_history": output.history,
        "out_plot": output.plot, "checkpoint_dir": _param(params, "checkpoint_dir"), "settings": settings,
    }  # fmt: skip
    processes = settings["training"].get("processes", 1)
    if processes > 1:
        from fewseg.distributed import launch_train_base

        result = launch_train_base(processes, job, job["checkpoint_dir"], getattr(progress, "handle", None))
    else:
        result = train(**job, progress_stream=progress)
    log.info("base model: %s", result)


def train_prompt(input, output, params, progress=None) -> None:
    from fewseg.train import train_prompt as train

    s = _param(params, "settings")
    phase = _param(params, "phase")
    start = getattr(input, "init", None) if phase == 2 else getattr(input, "pair", None)
    result = train(
        input.model,
        _support_tiles(input.support, s["cls"]),
        output.prompt,
        output.history,
        _param(params, "checkpoint_dir"),
        s,
        phase=phase,
        init_prompt=str(start) if start else None,
        progress_stream=progress,
    )
    log.info("class %d prompt: %s", s["cls"], result)


def select_support_pair(input, output, params, progress=None) -> None:
    from fewseg.train import select_pair

    s = _param(params, "settings")
    select_pair(input.model, _support_tiles(input.support, s["cls"]), output.pair, s)


# ---------------------------------------------------------------------------------------------------------------
# Predictions


def preview_palette(base_palette, novel_ids) -> np.ndarray:
    size = max([len(base_palette) - 1, *novel_ids]) + 1
    pal = np.zeros((max(size, 256), 3), dtype=np.uint8)
    pal[: len(base_palette)] = np.asarray(base_palette, dtype=np.uint8)
    for i, c in enumerate(sorted(novel_ids)):
        pal[c] = NOVEL_PREVIEW[i % len(NOVEL_PREVIEW)]
    return pal


def write_prediction(out_dir: Path, query: dict, ids: np.ndarray, image: np.ndarray, palette: np.ndarray) -> None:
    """A stage's outputs for one query: uint8 PNG ids, a GeoTIFF on the query's grid, and a preview."""
    stem = query["stem"]
    _write_png(out_dir / f"{stem}.png", ids)
    georef = read_georef(query["image"])
    write_geotiff(out_dir / "geotiff" / f"{stem}.tif", ids, crs=georef["crs"], transform=georef["transform"])
    preview = np.concatenate([image, np.full((image.shape[0], 4, 3), 255, np.uint8), palette[ids]], axis=1)
    _write_png(out_dir / "previews" / f"{stem}.png", preview)


def _model_and_device(model_path: str, runtime: dict):
    from fewseg.checkpoints import load_base_model
    from fewseg.runtime import freeze_for_precision, pick_device

    device = pick_device(runtime["device"])
    model, meta = load_base_model(model_path)
    model = freeze_for_precision(model.to(device).eval().requires_grad_(False), device, runtime["precision"])
    return model, meta, device


def infer_base(input, output, params, progress=None) -> None:
    from fewseg.palette import as_palette

    s = _param(params, "settings")
    model, _, device = _model_and_device(input.model, s["runtime"])
    palette = as_palette(s["palette"])
    tiles = {t["stem"]: t for t in _train_tiles(input.train)}
    mapping = read_json(input.mapping)["prompts"]
    queries = _queries(input.queries)
    show = preview_palette(palette, [])

    with atomic_dir(output[0]) as tmp:
        for n, q in enumerate(queries, 1):
            image = read_image(q["image"])
            prompt_tiles = [tiles[p["stem"]] for p in mapping[q["stem"]][: s["top_k"]]]
            ids = _predict_base_tile(model, image, prompt_tiles, palette, s, device)
            write_prediction(tmp, q, ids, image, show)
            log.info("base prediction %d/%d: %s", n, len(queries), q["stem"])


def _predict_base_tile(
    model, image: np.ndarray, prompt_tiles: list[dict], palette, s: dict, device, region: np.ndarray | None = None
) -> np.ndarray:
    """Base-class ids of one tile under the given train tiles as prompts, with the base inference settings ``s``
    (only where ``region`` is, where it is given: 255 elsewhere)."""
    from fewseg.data import resize_image, resize_nearest
    from fewseg.infer import BasePrompt, predict_base

    prompts = [
        BasePrompt(resize_image(read_image(t["image"]), s["working_size"]),
                   resize_nearest(read_image(t["mask"]), s["working_size"]))
        for t in prompt_tiles
    ]  # fmt: skip
    return predict_base(
        model, image, prompts, palette, working_size=s["working_size"], grid=s["grid"],
        seam_repair=s["seam_repair"], seam_band=s["seam_band"], device=device, batch_size=s["batch_size"],
        precision=s["runtime"]["precision"], region=region, outside=255, flips=s["flips"],
    )  # fmt: skip


def measure_background(input, output, params, progress=None) -> None:
    """How much of a novel class the base model leaves at 0 on the class's support tiles (overlay check "auto").

    Each support tile is predicted exactly as a query is (its own top-k train tiles by embedding, the base inference
    settings); the base model never trained on support tiles, so this is an honest preview of what the background
    check will let through on the queries.
    """
    from fewseg.mapping import load_embeddings, rank_prompts
    from fewseg.overlay import background_share
    from fewseg.palette import as_palette

    s = _param(params, "settings")
    cls = s["cls"]
    model, _, device = _model_and_device(input.model, s["runtime"])
    palette = as_palette(s["palette"])
    tiles = {t["stem"]: t for t in _train_tiles(input.train)}
    train_stems, train_feats = load_embeddings(input.train_embeddings)
    sup_stems, sup_feats = load_embeddings(input.support_embeddings)
    support = _support_tiles(input.support, cls)
    missing = [t["stem"] for t in support if t["stem"] not in sup_stems]
    if missing:
        raise InputError(input.support_embeddings, f"holds no embedding for support tiles {missing} of class {cls}")
    if any(stem not in tiles for stem in train_stems):
        raise InputError(input.train_embeddings, f"names train tiles that {input.train} does not hold")
    feats = sup_feats[[sup_stems.index(t["stem"]) for t in support]]
    order, _ = rank_prompts(feats, train_feats, s["top_k"])
    per_tile, zero_total, pixels_total = [], 0, 0
    base_counts = np.zeros(len(palette), np.int64)
    # Only the tiles that hold the class are predicted (the same ids there, at a fraction of the cost); seam repair
    # reads the neighbouring tiles, so with it every tile is.
    whole = s["seam_repair"] and s["grid"] > 1
    for n, (tile, ranked) in enumerate(zip(support, order, strict=True), 1):
        mask = read_label(tile["label"]) > 0
        ids = _predict_base_tile(model, read_image(tile["image"]), [tiles[train_stems[i]] for i in ranked], palette, s,
                                 device, region=None if whole else mask)  # fmt: skip
        if (ids[mask] == 255).any():
            raise RuntimeError(f"{tile['stem']}: class {cls} pixels outside the predicted tiles")
        zero, pixels = background_share(ids, mask)
        base_counts += np.bincount(ids[mask], minlength=len(palette))[: len(palette)]
        zero_total, pixels_total = zero_total + zero, pixels_total + pixels
        per_tile.append({"stem": tile["stem"], "pixels": pixels, "at_zero": zero})
        log.info("class %d support %d/%d %s: %d of %d px left at 0", cls, n, len(support), tile["stem"], zero, pixels)
    if pixels_total == 0:
        raise InputError(input.support, f"the support tiles of class {cls} hold no pixel of it")
    share = zero_total / pixels_total
    write_json(output[0], {
        "cls": cls, "share": share, "pixels": pixels_total, "at_zero": zero_total,
        "base_labels": {str(c): int(n) for c, n in enumerate(base_counts) if n}, "tiles": per_tile,
    })  # fmt: skip
    log.info("class %d: the base model leaves %.3f of its %d support pixels at 0", cls, share, pixels_total)


def infer_novel(input, output, params, progress=None) -> None:
    from fewseg.checkpoints import load_prompt
    from fewseg.infer import predict_novel_many

    s = _param(params, "settings")
    model, meta, device = _model_and_device(input.model, s["runtime"])
    prompt = load_prompt(input.prompt, meta["fingerprint"])
    if prompt["cls"] != s["cls"]:
        raise InputError(input.prompt, f"holds the prompt of class {prompt['cls']}, not {s['cls']}")
    show = preview_palette([(0, 0, 0)], [s["cls"]])
    queries = _queries(input.queries)
    with atomic_dir(output[0]) as tmp:
        held_out = prompt.get("meta", {}).get("best_held_out_iou")
        write_json(tmp / "prompt.json", {"cls": s["cls"], "best_held_out_iou": held_out})
        # As many queries at a time as their tiles fill a batch: one prompt serves them all, so they share forwards.
        group = max(1, s["batch_size"] // s["grid"] ** 2)
        for start in range(0, len(queries), group):
            chunk = queries[start : start + group]
            images = [read_image(q["image"]) for q in chunk]
            masks = predict_novel_many(
                model, images, prompt["prompt_image"], prompt["prompt_label"], working_size=s["working_size"],
                grid=s["grid"], seam_repair=s["seam_repair"], seam_band=s["seam_band"], batch_size=s["batch_size"],
                device=device, precision=s["runtime"]["precision"], flips=s["flips"],
            )  # fmt: skip
            for n, (q, image, mask) in enumerate(zip(chunk, images, masks, strict=True), start + 1):
                write_prediction(tmp, q, (mask > 0).astype(np.uint8) * np.uint8(s["cls"]), image, show)
                log.info("class %d prediction %d/%d: %s (%d px)", s["cls"], n, len(queries), q["stem"], int(mask.sum()))


def overlay_step(input, output, params, progress=None) -> None:
    from fewseg.overlay import filter_decision, paste_class, resolve_background_check

    s = _param(params, "settings")
    cls = s["cls"]
    mapping = read_json(input.mapping)
    queries = _queries(input.queries)
    show = preview_palette(_param(params, "palette"), _param(params, "novel"))
    check = s["background_check"]
    if check == "auto":
        measured = read_json(input.background)
        if measured.get("cls") != cls:
            raise InputError(input.background, f"holds the background share of class {measured.get('cls')}, not {cls}")
        check = resolve_background_check("auto", measured["share"], s["min_background_share"])
        log.info(
            "class %d: the base model leaves %.3f of its support pixels at 0 (overlay/min_background_share %.2f): "
            "background check %s", cls, measured["share"], s["min_background_share"], "on" if check else "off",
        )  # fmt: skip
    held_out = read_json(Path(input.novel) / "prompt.json").get("best_held_out_iou")
    gate = held_out is not None and held_out < s["min_prompt_iou"]
    if gate:
        log.warning(
            "class %d is not pasted: its prompt reached IoU %.4f on held-out support tiles, "
            "below overlay/min_prompt_iou %.2f",
            cls, held_out, s["min_prompt_iou"],
        )  # fmt: skip
    with atomic_dir(output[0]) as tmp:
        write_json(tmp / "overlay.json", {"cls": cls, "background_check": check, "pasted": not gate})
        for q in queries:
            stem = q["stem"]
            current = read_label(Path(input.previous) / f"{stem}.png")
            novel = read_label(Path(input.novel) / f"{stem}.png") == cls
            image = read_image(q["image"])
            sim = mapping["novel_similarity"].get(stem, {}).get(str(cls))
            decision = "skip" if gate else filter_decision(sim, s["filter"])
            out = paste_class(
                current, novel, cls, image=image, background_check=check,
                skip_nodata=s["skip_nodata"], decision=decision,
            )  # fmt: skip
            write_prediction(tmp, q, out, image, show)
            log.info("%s: class %d pasted on %d px (%s)", stem, cls, int((out != current).sum()), decision)


def make_submission(input, output, params, progress=None) -> None:
    from fewseg.submission import write_submission

    queries = _queries(input.queries)
    preds = {q["stem"]: Path(input.predictions) / f"{q['stem']}.png" for q in queries}
    missing = [str(p) for p in preds.values() if not p.is_file()]
    if missing:
        raise InputError(missing[0], "prediction missing for a query tile")
    names = write_submission(
        output[0], preds, {q["stem"]: (q["height"], q["width"]) for q in queries}, _param(params, "max_class")
    )
    log.info("submission with %d files: %s", len(names), output[0])


def _query_truths(queries: list[dict], truth_dir: str | os.PathLike) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, labels) of each query's ground truth, in order; a missing one is named."""
    for q in queries:
        truth_path = Path(truth_dir) / f"{q['stem']}.tif"
        if not truth_path.is_file():
            raise InputError(truth_path, "query label missing for evaluation")
        yield truth_path, read_label(truth_path)


def evaluate(input, output, params, progress=None) -> None:
    from fewseg.metrics import ConfusionMatrix, format_table, summarize

    s = _param(params, "settings")
    queries = _queries(input.queries)
    num = max([*s["base"], *s["novel"]]) + 1
    cm = ConfusionMatrix(num, s["ignore_index"])
    for q, (truth_path, truth) in zip(queries, _query_truths(queries, _param(params, "truth")), strict=True):
        pred = read_label(Path(input.predictions) / f"{q['stem']}.png")
        if pred.shape != truth.shape:
            raise InputError(truth_path, f"query label is {truth.shape}, the prediction {pred.shape}")
        cm.update(pred, truth)
    summary = summarize(cm, s["base"], s["novel"], s["names"])
    summary["queries"] = len(queries)
    write_json(output.json, summary)
    rows = [
        {"class": cid, "name": row["name"], "iou": "" if row["iou"] is None else f"{row['iou']:.4f}",
         "truth_pixels": row["truth_pixels"], "predicted_pixels": row["predicted_pixels"]}
        for cid, row in summary["per_class"].items()
    ]  # fmt: skip
    for key in ("base_miou", "novel_miou", "score"):
        rows.append(
            {"class": key, "name": "", "iou": f"{summary[key]:.4f}", "truth_pixels": "", "predicted_pixels": ""}
        )
    _write_tsv(output.table, rows)
    log.info("challenge metric over %d query tiles:\n%s", len(queries), format_table(summary))


def compare_prompts(input, output, params, progress=None) -> None:
    """The ablation: per novel class, the IoU on the query tiles of its learned prompt and of its best support pair
    used as a plain prompt (each prediction on its own, before the overlay), beside their held-out support IoUs."""
    from fewseg.metrics import ConfusionMatrix

    s = _param(params, "settings")
    queries = _queries(input.queries)
    found = _query_truths(queries, _param(params, "truth"))
    truths = {q["stem"]: truth for q, (_, truth) in zip(queries, found, strict=True)}
    rows = []
    for cls, learned, pair in zip(s["novel"], input.learned, input.pairs, strict=True):
        row = {"class": cls, "name": s["names"][cls]}
        for kind, folder in (("learned", learned), ("pair", pair)):
            cm = ConfusionMatrix(2, s["ignore_index"])
            for stem, truth in truths.items():
                pred = read_label(Path(folder) / f"{stem}.png")
                if pred.shape != truth.shape:
                    raise InputError(Path(folder) / f"{stem}.png", f"is {pred.shape}, its query label {truth.shape}")
                target = np.where(truth == s["ignore_index"], s["ignore_index"], truth == cls).astype(np.uint8)
                cm.update((pred == cls).astype(np.uint8), target)
            iou = cm.iou()[1]
            row[f"{kind}_iou"] = None if np.isnan(iou) else float(iou)
            row[f"{kind}_held_out_iou"] = read_json(Path(folder) / "prompt.json").get("best_held_out_iou")
        both = row["learned_iou"] is not None and row["pair_iou"] is not None
        row["gain"] = row["learned_iou"] - row["pair_iou"] if both else None
        rows.append(row)
    summary = {"queries": len(queries), "classes": rows}
    for kind in ("learned", "pair"):
        values = [r[f"{kind}_iou"] for r in rows if r[f"{kind}_iou"] is not None]
        summary[f"{kind}_miou"] = float(np.mean(values)) if values else None
    write_json(output.json, summary)

    def fmt(value):
        return "" if value is None else f"{value:.4f}"

    _write_tsv(output.table, [{k: fmt(v) if isinstance(v, float) or v is None else v for k, v in r.items()}
                              for r in rows])  # fmt: skip
    for r in rows:
        log.info("class %d (%s): learned prompt IoU %s, best support pair %s", r["class"], r["name"],
                 fmt(r["learned_iou"]), fmt(r["pair_iou"]))  # fmt: skip


def _write_tsv(path, rows: list[dict]) -> None:
    import csv

    from fewseg.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def job_statistics(input, output, params, progress=None) -> None:
    """One table of every heavy job's wall time, CPU time and peak memory, from Snakemake's benchmark files."""
    import csv

    rows = []
    for path in sorted(map(str, input)):
        with open(path) as fh:
            record = next(csv.DictReader(fh, delimiter="\t"))
        rows.append(
            {"job": Path(path).stem, "wall_s": record.get("s", ""), "cpu_s": record.get("cpu_time", ""),
             "max_rss_mb": record.get("max_rss", ""), "mean_load": record.get("mean_load", "")}
        )  # fmt: skip
    _write_tsv(output[0], rows)
    log.info("statistics of %d jobs", len(rows))
