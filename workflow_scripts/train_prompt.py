import _bootstrap  # noqa: F401

from fewseg.stages import run_stage, train_prompt

run_stage(snakemake, train_prompt)
