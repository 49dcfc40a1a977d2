"""Benchmarks behind docs/PERFORMANCE.md, one module per subsystem. Each prints its figures
with the machine, the date and the settings used. Run them from the repository root:

    python -m benchmarks.shards write                # shard writing, input slices/s per core
    python -m benchmarks.shards codecs               # encode/decode cost and size per codec
    python -m benchmarks.shards read                 # reading shards back, samples/s
    python -m benchmarks.loader                      # the training loader on one core
    python -m benchmarks.train gpu                   # training from the loader vs. synthetic tensors
    python -m benchmarks.train cpu-step              # seconds per training step on a CPU, per encoder
    python -m benchmarks.train augment               # batch augmentation with windows
    python -m benchmarks.evaluation metrics          # postprocessing + LiTS metrics of one case
    python -m benchmarks.evaluation infer            # whole-volume inference vs. the bare model
    python -m benchmarks.ceiling DATA --split test   # the visible-lesion oracle over a grid

``--help`` on any of them lists its options; tests/test_benchmark.py runs each at a tiny size.
"""
