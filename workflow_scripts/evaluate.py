import _bootstrap  # noqa: F401

from fewseg.stages import evaluate, run_stage

run_stage(snakemake, evaluate)
