"""liverseg: training and evaluation of liver / liver-tumour segmentation on shardgen shards."""

__version__ = "0.1.0"
