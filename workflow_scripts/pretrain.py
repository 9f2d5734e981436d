import _bootstrap  # noqa: F401

from fewseg.pretrain import pretrain_stage
from fewseg.stages import run_stage

run_stage(snakemake, pretrain_stage)
