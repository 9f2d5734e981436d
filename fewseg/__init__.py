"""fewseg: few-shot land-cover segmentation with a learnable-prompt SegGPT."""

__version__ = "0.1.0"
