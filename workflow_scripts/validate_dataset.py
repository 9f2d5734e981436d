import _bootstrap  # noqa: F401

from fewseg.stages import run_stage, validate_dataset

run_stage(snakemake, validate_dataset)
