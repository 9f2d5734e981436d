import _bootstrap  # noqa: F401

from fewseg.stages import infer_base, run_stage

run_stage(snakemake, infer_base)
