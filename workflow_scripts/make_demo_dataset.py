import _bootstrap  # noqa: F401

from fewseg.stages import make_demo_dataset, run_stage

run_stage(snakemake, make_demo_dataset)
