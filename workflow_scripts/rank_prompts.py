import _bootstrap  # noqa: F401

from fewseg.stages import rank_prompts, run_stage

run_stage(snakemake, rank_prompts)
