import _bootstrap  # noqa: F401

from fewseg.stages import train_base, run_stage

run_stage(snakemake, train_base)
