"""``liverseg-train``: train a liver / liver-tumour segmentation model from shardgen shards.

    # one process (CPU or one GPU)
    liverseg-train --shards shards --out runs/unet
    # every GPU of this machine, bf16 (launch/train.py is this command as a script)
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml launch/train.py \\
        --shards /data/shards --out runs/unet-r34 --steps 20000 --batch-size 32
    # resume where it stopped (same command plus --resume auto)
    accelerate launch launch/train.py --shards shards --out runs/unet --resume auto

Any setting of liverseg.config.TrainConfig can also come from --config FILE.yaml; flags win.
Flags default to None here so that a YAML value is not overridden; the defaults shown
are TrainConfig's own.
"""

from __future__ import annotations

import click

from shardgen.clihelp import CONTEXT_SETTINGS, friendly_errors, heavy_imports, verbose_option
from shardgen.settings import default_of

# torch-free: --help and a mistyped option must not wait for torch
from .config import BAD_SHARD_POLICIES, PRECISIONS, REPORTERS, TrainConfig, load_config


def shown(name: str) -> str:
    """``  [default: X]`` for a TrainConfig field (None as "none", booleans as on / off)."""
    value = default_of(TrainConfig, name)
    text = "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else value
    return f"  [default: {text}]"


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--shards", help="Shard folder, http(s) URL of one, or 'pipe:CMD {}' template.")
@click.option("--out", help="Run folder: checkpoints/, best/, last/, history.jsonl.")
@click.option("--config", "config_file", type=click.Path(exists=True), help="YAML with TrainConfig settings.")
@click.option("--arch", help="unet, resunet, or any smp architecture name." + shown("arch"))
@click.option("--encoder", help="smp encoder, e.g. resnet34, resnet18, efficientnet-b0." + shown("encoder"))
@click.option("--attention", type=click.Choice(["scse", "none"]), help="Decoder attention." + shown("attention"))
@click.option("--steps", type=int, help="Optimizer steps per process." + shown("steps"))
@click.option("--batch-size", type=int, help="Per process." + shown("batch_size"))
@click.option("--lr", type=float, help="Peak AdamW learning rate (warm-up, then cosine)." + shown("lr"))
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="auto: bf16 / fp16 on GPU, fp32 on CPU." + shown("precision"))
@click.option("--val-every", type=int, help="Validate every N steps." + shown("val_every"))
@click.option("--save-every", type=int, help="Save resumable state every N steps." + shown("save_every"))
@click.option("--resume", help="'auto' (latest in OUT/checkpoints) or a checkpoint folder.")
@click.option("--report-to", type=click.Choice(REPORTERS), help="Experiment tracker." + shown("report_to"))
@click.option("--workers", type=int, help="Data loader processes per rank." + shown("workers"))
@click.option("--oversample-tumour", type=float,
              help="Extra copies of tumour slices, on average." + shown("oversample_tumour"))
@click.option("--on-bad-shard", type=click.Choice(BAD_SHARD_POLICIES),
              help="A shard that cannot be read: stop with its name, or skip it with a warning "
                   "and count it." + shown("on_bad_shard"))
@click.option("--compile/--no-compile", default=None, help="torch.compile the model." + shown("compile"))
@click.option("--seed", type=int, help="Seed of the weights, the data order and the augmentation." + shown("seed"))
@verbose_option
@friendly_errors
def main(config_file, **flags) -> None:
    """Train U-Net / ResUNet models with Hugging Face Accelerate."""
    config = load_config(config_file, **flags)
    with heavy_imports():  # torch: only once the settings are known to be good
        from .train import train

    result = train(config)
    # every rank reports, so a multi-process run shows that all ranks ended at the same step
    skipped = f"; skipped {result.skipped_shards} bad shard(s)" if result.skipped_shards else ""
    print(f"rank {result.rank}/{result.world} finished at step {result.step}; "
          f"best {result.best or '-'}; run folder {result.run_dir}{skipped}", flush=True)


if __name__ == "__main__":
    main()
