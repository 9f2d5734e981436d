import _bootstrap  # noqa: F401

from fewseg.stages import run_stage, select_support_pair

run_stage(snakemake, select_support_pair)
