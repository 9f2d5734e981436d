import _bootstrap  # noqa: F401

from fewseg.stages import convert_train_masks, run_stage

run_stage(snakemake, convert_train_masks)
