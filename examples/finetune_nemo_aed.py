"""Fine-tune an NVIDIA NeMo attention-encoder-decoder model (Canary-style ``EncDecMultiTaskModel``) with NeMo's own
``trainer.fit``, with the monitor on: the one line that adds it is marked ``# <-- xattn_lightning``.

    python examples/finetune_nemo_aed.py --model canary.nemo --manifest train.tsv --val-manifest dev.tsv
    python examples/finetune_nemo_aed.py --tiny --manifest train.tsv --val-manifest dev.tsv   # no checkpoint needed

``--model`` restores a ``.nemo`` checkpoint (``EncDecMultiTaskModel.restore_from``); ``--tiny`` builds a tiny
Canary-style model with random weights from a config instead (a tokenizer trained on the manifests'
transcripts), which is what the tests run: no pretrained NeMo checkpoint was reachable offline to test
against. Manifests are ``id<TAB>audio<TAB>text``; they are written out as NeMo JSON-lines manifests.
Needs ``pip install "xattn_lightning[nemo]"`` (NeMo pins ``lightning<=2.4.0``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from xattn_lightning import XAttnSaliencyMonitor  # <-- xattn_lightning
from xattn_lightning.audio import read_manifest
from xattn_lightning.loggers import wandb_logger
from xattn_lightning.testing.nemo import build_tokenizers, nemo_manifest, tiny_canary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a .nemo checkpoint of an EncDecMultiTaskModel")
    source.add_argument("--tiny", action="store_true", help="a tiny random Canary-style model built from a config")
    p.add_argument("--manifest", required=True)
    p.add_argument("--val-manifest", required=True)
    p.add_argument("--out", default="runs/nemo")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--val-every", type=int, default=50, help="validate every N training steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-probes", type=int, default=2)
    p.add_argument("--n-masks", default="auto")
    p.add_argument(
        "--targets",
        default="generate",
        choices=("generate", "labels"),
        help="explain the model's hypothesis or the reference (a random --tiny model decodes no text)",
    )
    p.add_argument("--max-overhead", default="0.1", help="the monitor's share of training time, or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument("--no-monitor", action="store_true", help="the same fine-tune without the monitor")
    args = p.parse_args(argv)
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from omegaconf import open_dict

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = read_manifest(args.manifest), read_manifest(args.val_manifest)
    train, val = nemo_manifest(train_rows, out / "train.jsonl"), nemo_manifest(val_rows, out / "val.jsonl")
    pl.seed_everything(args.seed)
    if args.tiny:
        tokenizers = build_tokenizers([r.text for r in train_rows + val_rows], out / "tokenizers")
        model = tiny_canary(tokenizers, seed=args.seed)
    else:
        model = EncDecMultiTaskModel.restore_from(args.model, map_location="cpu")
    data = {"use_lhotse": True, "sample_rate": 16000, "batch_size": args.batch_size, "num_workers": 0,
            "use_bucketing": False, "pin_memory": False}  # fmt: skip
    with open_dict(model.cfg):
        model.cfg.train_ds = {
            **data,
            "manifest_filepath": str(train),
            "shuffle": True,
            "seed": args.seed,
            "shard_seed": args.seed,
        }
        model.cfg.validation_ds = {**data, "manifest_filepath": str(val), "shuffle": False}
    model.setup_training_data(model.cfg.train_ds)
    model.setup_validation_data(model.cfg.validation_ds)
    model.setup_optimization(model.cfg.optim)

    loggers: list[Any] = [CSVLogger(out / "csv")]
    if not args.no_wandb:
        loggers.append(wandb_logger(project="xattn-nemo", save_dir=out))
    callbacks: list[pl.Callback] = []
    if not args.no_monitor:
        n_masks = args.n_masks if args.n_masks == "auto" else int(args.n_masks)
        overhead = None if args.max_overhead == "none" else float(args.max_overhead)
        monitor = XAttnSaliencyMonitor(
            num_probes=args.num_probes, n_masks=n_masks, max_overhead=overhead, targets=args.targets
        )
        callbacks.append(monitor)  # <-- xattn_lightning
    trainer = pl.Trainer(
        max_steps=args.max_steps, val_check_interval=args.val_every, check_val_every_n_epoch=None,
        limit_val_batches=1, num_sanity_val_steps=0, accelerator="auto", devices=1, logger=loggers,
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,  # Lhotse samples itself
        log_every_n_steps=1, deterministic=True,
    )  # fmt: skip
    model.set_trainer(trainer)
    trainer.fit(model)
    monitor = callbacks[0] if callbacks else None
    return {"model": model, "trainer": trainer, "history": monitor.history if monitor else [], "monitor": monitor}


if __name__ == "__main__":
    main()
