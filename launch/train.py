"""Train a liver / liver-tumour segmentation model from shardgen shards: the script that
``accelerate launch`` runs; the same command as the ``liverseg-train`` console script
(liverseg/train_cli.py, where the flags are).

    # one process (CPU or one GPU)
    accelerate launch launch/train.py --shards shards --out runs/unet
    # every GPU of this machine, bf16
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml launch/train.py \
        --shards /data/shards --out runs/unet-r34 --steps 20000 --batch-size 32
    # resume where it stopped (same command plus --resume auto)
    accelerate launch launch/train.py --shards shards --out runs/unet --resume auto

Any setting of liverseg.config.TrainConfig can also come from --config FILE.yaml; flags win.
"""

from liverseg.train_cli import main

if __name__ == "__main__":
    main()
