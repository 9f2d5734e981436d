import _bootstrap  # noqa: F401

from fewseg.stages import embed_tiles, run_stage

run_stage(snakemake, embed_tiles)
