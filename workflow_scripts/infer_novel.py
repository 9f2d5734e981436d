import _bootstrap  # noqa: F401

from fewseg.stages import infer_novel, run_stage

run_stage(snakemake, infer_novel)
