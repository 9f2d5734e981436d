import _bootstrap  # noqa: F401

from fewseg.stages import run_stage, split_support

run_stage(snakemake, split_support)
