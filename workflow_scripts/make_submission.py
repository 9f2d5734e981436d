import _bootstrap  # noqa: F401

from fewseg.stages import make_submission, run_stage

run_stage(snakemake, make_submission)
