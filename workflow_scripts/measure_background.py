import _bootstrap  # noqa: F401

from fewseg.stages import measure_background, run_stage

run_stage(snakemake, measure_background)
