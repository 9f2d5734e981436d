# Config validation at start-up, per-rule config slices and input functions. No stage logic lives here.
import sys
from pathlib import Path

# fewseg from this checkout when it is not installed
if str(Path(workflow.basedir)) not in sys.path:
    sys.path.insert(0, str(Path(workflow.basedir)))

import fewseg.config as fc

# YAML silently keeps the last of two equal keys: re-read the config files strictly to refuse that.
for _configfile in workflow.configfiles:
    fc.load_yaml(_configfile)

# Your --configfile is laid over config.yaml key by key; the defaults' entries for classes your config does not have
# are dropped, so a file with another class set needs no edit of config.yaml, and weights you name must exist
# (fewseg/config.py adapt_defaults).
# Then the schema (fewseg/schemas/config.schema.yaml) and cross-field and path checks, every problem by its key.
# A relative model/weights path not in the working directory is looked up in the workflow's folder (resources/).
CFG = fc.check_config(
    fc.adapt_defaults(config, workflow.config_settings.overwrite_config),
    resource_dirs=[workflow.basedir],
)

ORDER = CFG["overlay"]["order"]

# Threads of the many small jobs (one per novel class or tile set: support pairs, prompt phases, novel and base
# inference, background measurement, embeddings). Each spends seconds on one core (start-up, reading tiles,
# resizing, decoding), so two one-thread jobs side by side finish sooner than the same jobs one after another on
# two threads: on 2 cores the demo's jobs after base training took 336 s instead of 430 s, with the same
# submission, and base inference took 49 core-seconds on one thread against 68 on two. On a bigger machine more
# classes run at once; raise it with --set-threads RULE=N (profiles/slurm has an example).
CLASS_JOB_THREADS = 1

# Which ready jobs start first when they outnumber the cores (Snakemake's `priority:`; it does not pass to a job's
# inputs, so every job on a path that should start early carries it). Base training first: everything after it
# waits for it, and the tile embeddings need not run before it. Then base inference and the embeddings and ranking
# it reads, so that this long job does not end the run alone; then each class's prompt chain (support pair, prompt
# phases, novel inference), the background measurements the overlay also needs, and last the ablation's
# support-pair inference, which only the report reads.
PRIORITY = {"base_model": 4, "base_inference": 3, "prompt_chain": 2, "overlay_input": 1}


onstart:
    # one run per working directory; see fewseg/runlock.py and profiles/default
    import fewseg.runlock

    try:
        fewseg.runlock.acquire(".snakemake/fewseg.lock")
    except fewseg.runlock.RunLockError as err:
        sys.exit(f"fewseg error: {err}")


# Library modules behind each stage (read from the import graph): their source digest is a param, so a library
# change reruns what it touches.
CODE = fc.stage_digests()


wildcard_constraints:
    cls=r"\d+",
    step=r"\d+",
    subset="train|query|support",


def dataset_root():
    """The demo dataset is a rule's output; a real dataset is a folder the user points to."""
    return (
        fc.DEMO_ROOT if CFG["dataset"]["source"] == "demo" else CFG["dataset"]["root"]
    )


def query_labels_input():
    """Query labels inside the generated demo dataset come with its rule's output; elsewhere they are a folder."""
    if CFG["dataset"]["source"] == "demo":
        return fc.DEMO_ROOT
    return fc.query_labels_dir(CFG) or []


# Every stage that reads the dataset, and every heavy job, waits for the whole dataset's verdict. ancient(): a rerun
# of the check (new data, another support split) does not by itself rerun the jobs behind it.
VALIDATED = "results/validation/dataset.json"


def validated():
    return ancient(VALIDATED)


def validation_settings():
    d = CFG["dataset"]
    keys = (
        "train_dir",
        "test_dir",
        "shots",
        "ignore_index",
        "split_lists",
        "query_labels",
    )
    return {k: d[k] for k in keys}


def conversion_settings():
    d = CFG["dataset"]
    return {"train_dir": d["train_dir"], "ignore_index": d["ignore_index"]}


def split_settings():
    d = CFG["dataset"]
    keys = ("train_dir", "test_dir", "shots", "ignore_index", "split_lists")
    return {k: d[k] for k in keys}


def overlay_previous(wildcards):
    step = int(wildcards.step)
    if step == 1:
        return "results/predictions/base"
    return f"results/predictions/overlay_{step - 1}"


def overlay_novel(wildcards):
    return f"results/predictions/novel_{ORDER[int(wildcards.step) - 1]}"


def overlay_background(wildcards):
    """The class's measured background share, where its background check is "auto"."""
    cls = ORDER[int(wildcards.step) - 1]
    if cls in fc.background_measured(CFG):
        return {"background": f"results/validation/background_{cls}.json"}
    return {}


def pretrained_weights():
    """The weights base training starts from, as an input: replacing the file reruns the training."""
    return [CFG["model"]["weights"]] if CFG["model"]["weights"] else []


def pretraining_start():
    """The weights a second pretraining stage continues from (pretraining.start_from), found like model.weights."""
    start = CFG.get("pretraining", {}).get("start_from")
    if not start:
        return []
    shipped = Path(workflow.basedir) / start
    return [str(shipped) if not Path(start).is_file() and shipped.is_file() else start]


def phase1_start(wildcards):
    """The support pair phase 1 starts from (prompt_training.init: support_pair); none for a random start."""
    if CFG["prompt_training"]["init"] == "support_pair":
        return f"results/prompts/{wildcards.cls}/pair.pt"
    return []


def learned_predictions():
    """Each novel class's predictions under its learned prompt, in classes/novel order."""
    return [f"results/predictions/novel_{c}" for c in CFG["classes"]["novel"]]


def pair_predictions():
    """Each novel class's predictions under its best support pair, in classes/novel order."""
    return [f"results/predictions/pair_{c}" for c in CFG["classes"]["novel"]]


def final_predictions():
    return f"results/predictions/overlay_{len(ORDER)}"


def benchmark_files():
    """Benchmarks of the heavy jobs, collected into one runtime and memory table for the report."""
    files = [
        f"results/benchmarks/embed_tiles_{s}.tsv" for s in ("train", "query", "support")
    ]
    files += ["results/benchmarks/train_base.tsv", "results/benchmarks/infer_base.tsv"]
    evaluated = bool(fc.query_labels_dir(CFG))
    for cls in ORDER:
        files += [
            f"results/benchmarks/train_prompt_phase1_{cls}.tsv",
            f"results/benchmarks/train_prompt_phase2_{cls}.tsv",
            f"results/benchmarks/infer_novel_{cls}.tsv",
        ]
        if evaluated or CFG["prompt_training"]["init"] == "support_pair":
            files.append(f"results/benchmarks/select_support_pair_{cls}.tsv")
        if evaluated:
            files.append(f"results/benchmarks/infer_novel_pair_{cls}.tsv")
        if cls in fc.background_measured(CFG):
            files.append(f"results/benchmarks/measure_background_{cls}.tsv")
    return files


def final_targets():
    targets = ["results/submission.zip", "results/job_statistics.tsv"]
    if fc.query_labels_dir(CFG):
        targets += ["results/metrics.json", "results/ablation/prompts.json"]
    return targets
