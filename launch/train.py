"""Train a liver / liver-tumour segmentation model from shardgen shards.

    # one process (CPU or one GPU)
    accelerate launch launch/train.py --shards shards --out runs/unet
    # every GPU of this machine, bf16
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml launch/train.py \
        --shards /data/shards --out runs/unet-r34 --steps 20000 --batch-size 32
    # resume where it stopped (same command plus --resume auto)
    accelerate launch launch/train.py --shards shards --out runs/unet --resume auto

Any setting of liverseg.config.TrainConfig can also come from --config FILE.yaml; flags win.
"""

from __future__ import annotations

import sys

import click

from liverseg.config import BAD_SHARD_POLICIES, PRECISIONS, REPORTERS, load_config
from liverseg.errors import LiversegError
from shardgen.errors import ShardgenError, os_error_line


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--shards", help="Shard folder, http(s) URL of one, or 'pipe:CMD {}' template.")
@click.option("--out", help="Run folder: checkpoints/, best/, last/, history.jsonl.")
@click.option("--config", "config_file", type=click.Path(exists=True), help="YAML with TrainConfig settings.")
@click.option("--arch", help="unet, resunet, or any smp architecture name.  [default: unet]")
@click.option("--encoder", help="smp encoder, e.g. resnet34, resnet18, efficientnet-b0.  [default: resnet34]")
@click.option("--attention", type=click.Choice(["scse", "none"]), help="Decoder attention.  [default: none]")
@click.option("--steps", type=int, help="Optimizer steps per process.  [default: 2000]")
@click.option("--batch-size", type=int, help="Per process.  [default: 16]")
@click.option("--lr", type=float, help="Peak AdamW learning rate (warm-up, then cosine).  [default: 1e-3]")
@click.option("--precision", type=click.Choice(PRECISIONS), help="auto: bf16 / fp16 on GPU, fp32 on CPU.")
@click.option("--val-every", type=int, help="Validate every N steps.  [default: 250]")
@click.option("--save-every", type=int, help="Save resumable state every N steps.  [default: 500]")
@click.option("--resume", help="'auto' (latest in OUT/checkpoints) or a checkpoint folder.")
@click.option("--report-to", type=click.Choice(REPORTERS), help="Experiment tracker.  [default: none]")
@click.option("--workers", type=int, help="Data loader processes per rank.  [default: 4]")
@click.option("--oversample-tumour", type=float, help="Extra copies of tumour slices, on average.")
@click.option("--on-bad-shard", type=click.Choice(BAD_SHARD_POLICIES),
              help="A shard that cannot be read: stop with its name, or skip it with a warning "
                   "and count it.  [default: fail]")
@click.option("--compile/--no-compile", default=None, help="torch.compile the model.  [default: off]")
@click.option("--seed", type=int, help="[default: 0]")
def main(config_file, **flags) -> None:
    """Train U-Net / ResUNet models with Hugging Face Accelerate."""
    from liverseg.train import train

    try:
        config = load_config(config_file, **flags)
        result = train(config)
    except (LiversegError, ShardgenError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # an --out that is a file, a full disk: the path and the reason
        raise click.ClickException(os_error_line(exc)) from None
    # every rank reports, so a multi-process run shows that all ranks ended at the same step
    skipped = f"; skipped {result.skipped_shards} bad shard(s)" if result.skipped_shards else ""
    print(f"rank {result.rank}/{result.world} finished at step {result.step}; "
          f"best {result.best or '-'}; run folder {result.run_dir}{skipped}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
