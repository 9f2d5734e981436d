# fewseg: raw OpenEarthMap-style tiles -> results/submission.zip (and results/metrics.json when query labels exist).
# Stages follow the learnable-prompt SegGPT system; README.md describes the DAG, the method and its settings.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/mapping.smk"
include: "rules/training.smk"
include: "rules/inference.smk"
include: "rules/submission.smk"


localrules:
    all,
    make_demo_dataset,
    validate_dataset,
    convert_train_masks,
    split_support,
    overlay_step,
    make_submission,
    evaluate,
    compare_prompts,
    job_statistics,


rule all:
    default_target: True
    input:
        final_targets(),


include: "rules/pretrain.smk"
