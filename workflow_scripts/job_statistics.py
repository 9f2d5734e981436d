import _bootstrap  # noqa: F401

from fewseg.stages import job_statistics, run_stage

run_stage(snakemake, job_statistics)
