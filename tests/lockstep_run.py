"""Fits of a tiny encoder-decoder whose forward all-reduces (``TinyS2T`` with its front-end and output projection
wrapped in :class:`AllReduced`, as hand-written tensor-parallel layers do) on 2 CPU processes (gloo, DDP), with the
monitor in lockstep; rank 0 writes what tests/unit/test_lockstep.py checks, and each rank its own file. All fits
run in the same two processes (Lightning's launcher starts rank 1 by running this script again).

    python tests/lockstep_run.py OUT_JSON CASE [CASE ...]

Cases: ``without`` (no monitor: the weights of training alone), ``true`` (``lockstep=True``), ``split``
(``lockstep=False``: the probes split across ranks, which hangs in the model's all-reduce; not run by the tests), ``auto``
(``lockstep="auto"``, which must find the all-reduce), ``raise`` (rank 1 raises in the middle of its second probe at
the first reading, between two forwards), ``delay`` (rank 1 is late past ``reading_timeout`` in the middle of a probe
at the first reading), ``plain`` (a model without collectives, ``"auto"``: the probes split across ranks) and
``plain-true`` (that model with ``lockstep=True``: the cost of lockstep against a split reading). Every
fit is 2 epochs of 4 steps and reads 3 probes of different lengths (split, rank 0 would explain 2 and rank 1 one);
each reading is also made again on rank 0, in one process, from the weights it read (``reference``).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from helpers import same_weights, write_rank_results
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

import xattn_lightning as xl
from xattn_lightning.adapters import HookAdapter
from xattn_lightning.monitoring import Instrument, MonitorConfig
from xattn_lightning.monitoring.core import SingleProcess
from xattn_lightning.testing import TinyS2T

TIMEOUT = 3.0  # reading_timeout of the fault cases (s); the late rank sleeps 3 times that
LENGTHS = (16, 40, 28)  # the probes' frames: split over 2 ranks, rank 0 would read 16 and 28, rank 1 40


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """A differentiable all-reduce over the default group (no-op outside one)."""
    if not torch.distributed.is_initialized():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)


class AllReduced(nn.Module):
    """``inner``'s output split into ``world`` equal parts summed across processes by ``reduce`` (the pattern of a
    row-parallel layer): with the same input on every process, the output is ``inner``'s, bit for bit (halves of
    a float add up exactly)."""

    def __init__(self, inner: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor], world: int) -> None:
        super().__init__()
        self.inner, self.reduce, self.world = inner, reduce, world
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return self.reduce(out / self.world) if self.active else out


def collective_s2t(reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum, world: int = 2) -> TinyS2T:
    """A TinyS2T whose encoder front-end and output projection run ``reduce`` in their forward (seeded weights)."""
    torch.manual_seed(0)
    model = TinyS2T(vocab_size=24, num_mel_bins=8)
    model.subsample = AllReduced(model.subsample, reduce, world)
    model.out = AllReduced(model.out, reduce, world)
    return model


def set_collectives(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, AllReduced):
            m.active = on


def probes() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_features": torch.randn(1, t, 8, generator=g)} for t in LENGTHS]


def train_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(24, 8, generator=g), torch.randint(3, 24, (6,), generator=g)) for _ in range(n)]


class Module(pl.LightningModule):
    def __init__(self, collectives: bool) -> None:
        super().__init__()
        self.model = collective_s2t() if collectives else collective_s2t(lambda x: x * 2, world=2)

    def training_step(self, batch, batch_idx):
        feats, labels = batch
        ids = torch.cat([torch.ones(labels.shape[0], 1, dtype=torch.long), labels], dim=1)
        logits = self.model(feats, ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def validation_step(self, batch, batch_idx):
        self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class FaultyAdapter(HookAdapter):
    """TinyS2T's adapter, counting the probes it generates for, with a fault on rank 1 at the first reading: on its
    second probe, ``raise`` raises after 3 decoder passes and ``delay`` sleeps past ``reading_timeout`` there."""

    def __init__(self, owner: Module, mode: str) -> None:
        model = owner.model
        super().__init__(
            model,
            encoder="encoder",
            cross_attention="decoder.layers.*.multihead_attn",
            decoder_start_id=1,
            eos_id=2,
            special_ids=(0,),
            frames_per_step=4,
            num_mel_bins=model.num_mel_bins,
            max_target_positions=model.max_len,
        )  # fmt: skip  (TinyS2T.adapter's)
        self.owner, self.mode = owner, mode
        self.generated: dict[int, int] = owner.generated
        self.decodes = 0

    def generate(self, *args, **kwargs):
        epoch = self.owner.current_epoch
        self.generated[epoch] = self.generated.get(epoch, 0) + 1
        self.decodes = 0
        return super().generate(*args, **kwargs)

    def decode(self, *args, **kwargs):
        self.decodes += 1
        faulty = self.owner.global_rank == 1 and self.owner.current_epoch == 0 and self.generated.get(0) == 2
        if faulty and self.decodes == 3:
            if self.mode == "raise":
                raise RuntimeError("a fault injected on rank 1")
            if self.mode == "delay":
                time.sleep(3 * TIMEOUT)
        return super().decode(*args, **kwargs)


class Snapshot(pl.Callback):
    """The weights at each reading (it runs before the monitor at the end of validation)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.states.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


OPTIONS = dict(num_probes=3, n_masks=8, max_new_tokens=6, max_overhead=None, log_figures=False)


def reference(states: list[dict[str, torch.Tensor]]) -> list[dict]:
    """Each reading again, in this one process, with the collectives off: what one process reads."""
    inst = Instrument(MonitorConfig(**OPTIONS), probes_source=probes())
    for step, state in enumerate(states):
        model = collective_s2t()
        model.load_state_dict(state)
        set_collectives(model, False)
        inst.read(SingleProcess(), TinyS2T.adapter(model), step=step, epoch=step)
    return inst.publisher.history.entries


def fit(case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    pl.seed_everything(0, verbose=False)
    module = Module(collectives=not case.startswith("plain"))
    module.generated = {}
    snapshot = Snapshot()
    callbacks: list = [snapshot]
    if case != "without":
        timeout = TIMEOUT if case in ("raise", "delay") else 60.0
        callbacks.append(
            xl.XAttnSaliencyMonitor(
                probes=probes(),
                model_fn=lambda m: FaultyAdapter(m, case),
                reading_timeout=timeout,
                lockstep={"true": True, "plain-true": True, "split": False}.get(case, "auto"),
                **OPTIONS,
            )  # fmt: skip
        )
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=1,
    )  # fmt: skip
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(train_data(8), batch_size=1), DataLoader(train_data(2), batch_size=1))
    out: dict = {"seconds": time.perf_counter() - t0, "generated": module.generated}
    out["warnings"] = [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message)]
    if case != "without":
        out["history"] = callbacks[1].history
        if trainer.global_rank == 0 and case in ("true", "auto"):
            out["reference"] = reference(snapshot.states)
    return out, {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def main(path: str, cases: list[str]) -> None:
    results: dict = {}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for case in cases:
        results[case], weights[case] = fit(case)
    for case in cases:  # training with the monitor, bit for bit the same as without
        if "without" in weights and case != "without" and not case.startswith("plain"):
            a, b = weights[case], weights["without"]
            results[case]["same_weights"] = same_weights(a, b)
    write_rank_results(path, results)


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("LOCKSTEP_RUN_DUMP_AFTER", "600")), exit=True)
    main(sys.argv[1], sys.argv[2:])
