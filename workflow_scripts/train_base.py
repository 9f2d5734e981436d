import _bootstrap  # noqa: F401

from fewseg.stages import run_stage, train_base

run_stage(snakemake, train_base)
