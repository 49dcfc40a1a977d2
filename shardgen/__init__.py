"""shardgen: turn CT volumes (LiTS, MSD Task03, or built-in phantoms) into WebDataset shards.

Imports no torch: it runs on CPU-only data-preparation machines.
"""

__version__ = "0.1.0"
