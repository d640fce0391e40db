"""Fits of a tiny random Whisper on 2 CPU processes (gloo) under DDP, FSDP (a CPU subclass of Lightning's
``FSDPStrategy``) and FSDP2 (``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with
``fully_shard``-ed layers), with and without the monitor, and with a fault injected on rank 1 only; rank 0
writes what tests/unit/test_sharded.py checks. All fits run in the same two processes (Lightning's launcher
starts rank 1 by running this script again), so the imports are paid once.

    python tests/sharded_run.py OUT_JSON CASE [CASE ...]

A case is ``STRATEGY-MODE``: ``ddp|fsdp|fsdp2`` and ``with`` (the monitor), ``without``, ``delay`` (rank 1 is
late past ``reading_timeout`` at the first reading), ``raise`` (rank 1's first probe fails at the first reading), ``small`` (``max_gathered_gb`` below the
model's size) or ``lockstep`` (``lockstep=True``: every rank reads every probe, on the unsharded copy). Every fit is 2 epochs of 4 steps; 3 probes of different lengths, so rank 0 explains two, rank 1 one.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import lightning.pytorch as pl
import torch
from helpers import same_weights, write_rank_results
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from helpers import speaking_tiny_whisper, tiny_extractor  # noqa: E402

import xattn_lightning as xl  # noqa: E402
from xattn_lightning.adapters.hf_whisper import WhisperAdapter  # noqa: E402
from xattn_lightning.monitoring.sharded import clean_name  # noqa: E402

TIMEOUT = 2.0  # reading_timeout of the fault cases (s); the late rank sleeps 3 times that


def whisper() -> torch.nn.Module:
    """The tests' tiny random Whisper; ``SHARDED_RUN_SIZE=tiny.en``: whisper-tiny.en's dimensions (37.8 M
    parameters, random, a 2-s window) for measuring what a reading costs."""
    if os.environ.get("SHARDED_RUN_SIZE") != "tiny.en":
        return speaking_tiny_whisper()
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=51864, num_mel_bins=16, d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
        decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, max_source_positions=100,
        max_target_positions=448, decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256,
        bos_token_id=50256, begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(cfg).eval()
    gen = model.generation_config
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id = 50257, 50256, 50256
    gen.forced_decoder_ids, gen.max_length, gen.no_timestamps_token_id = None, 20, 50362
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[50256:] *= 0.01  # tied output projection: specials unlikely
    return model


class CPUFSDP(FSDPStrategy):
    """Lightning refuses the exact class ``FSDPStrategy`` on CPU (a check on ``type(strategy) is FSDPStrategy``);
    FSDP itself runs on CPU with gloo."""


class Module(pl.LightningModule):
    def __init__(self, shard: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.shard = shard
        self.model = whisper()
        self.processor = tiny_extractor()

    def configure_model(self) -> None:
        if not torch.distributed.is_initialized():  # loaded from a checkpoint, outside training: a plain model
            return
        if self.shard == "fsdp":  # wrapped here: torch's FSDP needs device_id=cpu on CPU, which Lightning does not pass
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer, WhisperEncoderLayer

            policy = ModuleWrapPolicy({WhisperEncoderLayer, WhisperDecoderLayer})
            self.model = FullyShardedDataParallel(
                self.model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True
            )
        if self.shard == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in [*self.model.model.encoder.layers, *self.model.model.decoder.layers]:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.model(input_features=batch[0], labels=batch[1]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_features=batch[0], labels=batch[1]).loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=float(os.environ.get("SHARDED_RUN_LR", "1e-3")))


def data(n: int, seed: int, lengths: tuple[int, ...] = (120,)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        feats = torch.full((16, 200), -0.5)
        t = lengths[i % len(lengths)]
        feats[:, :t] = torch.randn(16, t, generator=g)
        labels = torch.randint(3, 40, (5,), generator=g)
        labels[-1] = 50
        out.append((feats, labels))
    return out


def strategy(name: str):
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "fsdp":
        return CPUFSDP(process_group_backend="gloo", state_dict_type="sharded")
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")


class FaultyAdapter(WhisperAdapter):
    """Whisper's adapter with a fault on rank 1 at the first reading (epoch 0): ``delay`` makes rank 1 late past
    ``reading_timeout``; ``raise`` makes its first probe fail."""

    def __init__(self, owner: Module, mode: str) -> None:
        super().__init__(owner.model)
        self.owner, self.mode = owner, mode

    def generate(self, *args, **kwargs):
        self.owner.generated += 1
        if self.owner.global_rank == 1 and self.owner.current_epoch == 0:
            if self.mode == "delay":
                time.sleep(3 * TIMEOUT)
            elif self.mode == "raise":
                raise RuntimeError("a fault injected on rank 1")
        return super().generate(*args, **kwargs)


def model_fn(mode: str):
    def pick(module: Module):
        return FaultyAdapter(module, mode) if mode in ("delay", "raise", "lockstep") else module.model

    return pick


def full_weights(trainer: pl.Trainer, module: Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {clean_name(k): v.detach().clone() for k, v in state.items()}


def fit(case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    name, mode = case.split("-")
    pl.seed_everything(0, verbose=False)
    module = Module(name)
    module.generated = 0  # probes explained on this rank (model_fn's adapter counts them)
    callbacks = []
    if mode != "without":
        timeout = TIMEOUT if mode in ("delay", "raise") else 60.0
        callbacks.append(
            xl.XAttnSaliencyMonitor(
                num_probes=3,
                n_masks=8,
                max_overhead=None,
                log_figures=False,
                model_fn=model_fn(mode),
                reading_timeout=timeout,
                max_gathered_gb=1e-6 if mode == "small" else None,
                lockstep=True if mode == "lockstep" else "auto",
            )  # fmt: skip
        )
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy=strategy(name), callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    train = DataLoader(data(8, 0), batch_size=1)
    val = DataLoader(data(6, 1, lengths=(60, 150, 100)), batch_size=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    if os.environ.get("SHARDED_RUN_CKPT_DIR") and mode == "with":  # a distributed checkpoint directory (shards)
        trainer.save_checkpoint(os.path.join(os.environ["SHARDED_RUN_CKPT_DIR"], f"{case}.ckpt"))
    out: dict = {"generated": module.generated, "warnings": [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message)]}
    if callbacks:
        mon = callbacks[0]
        out["history"] = mon.history
        out["gather_cost"] = mon.instrument.gather_cost
    weights = full_weights(trainer, module)
    if os.environ.get("SHARDED_RUN_CKPT_DIR") and mode == "with" and trainer.global_rank == 0:
        torch.save(weights, os.path.join(os.environ["SHARDED_RUN_CKPT_DIR"], f"{case}.weights.pt"))
    return out, weights


def main(path: str, cases: list[str]) -> None:
    results: dict = {}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for case in cases:
        results[case], weights[case] = fit(case)
    for case in cases:  # training with the monitor, bit for bit the same as without
        base = case.split("-")[0] + "-without"
        if base in weights and case != base:
            a, b = weights[case], weights[base]
            results[case]["same_weights"] = same_weights(a, b)
    for case in cases:  # how far each strategy's trained weights are from DDP's (float rounding of the reductions)
        if "ddp-with" in weights and case != "ddp-with" and case.endswith("-with"):
            a, b = weights[case], weights["ddp-with"]
            results[case]["weights_vs_ddp"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    write_rank_results(path, results)


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("SHARDED_RUN_DUMP_AFTER", "600")), exit=True)
    main(sys.argv[1], sys.argv[2:])
