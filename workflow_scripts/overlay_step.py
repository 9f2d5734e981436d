import _bootstrap  # noqa: F401

from fewseg.stages import overlay_step, run_stage

run_stage(snakemake, overlay_step)
