import _bootstrap  # noqa: F401

from fewseg.stages import train_prompt, run_stage

run_stage(snakemake, train_prompt)
