import _bootstrap  # noqa: F401

from fewseg.stages import split_support, run_stage

run_stage(snakemake, split_support)
