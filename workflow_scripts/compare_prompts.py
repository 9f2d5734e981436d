import _bootstrap  # noqa: F401

from fewseg.stages import compare_prompts, run_stage

run_stage(snakemake, compare_prompts)
