"""Performance benchmarks, reported as ratios measured in one run (these machines are noisy).

    python -m benchmarks.perf --model openai/whisper-tiny.en --manifest data/manifest.tsv --out results/
    python -m benchmarks.perf                     # a tiny random Whisper when no model is given

Sections (``--only`` picks some): ``spes`` (masks/s of SPES against a plain one-pass-per-mask loop
and against the limit: the same number of batched teacher-forced passes with no masking or
scoring; peak memory), ``encoder`` (encoder-output saliency per mask vs input SPES per mask),
``kv`` (encoder-output saliency per mask: cross-attention keys/values projected once and masked
vs zeroing frames and re-running the decoder; the maps' max difference), ``kl`` (the KL of each mask's
predictions: one pass over the logits vs ``log_softmax`` + ``F.kl_div``, per mask, at several mask
batch sizes, beside the masked decoder pass itself; the largest difference), ``batch`` (encoder-output
saliency per mask with ``encoder_batch_size="auto"`` against the former fixed 32, interleaved, and the
maps' largest difference), ``flops`` (the arithmetic of a reading's parts, counted with
``torch.utils.flop_counter``, against the rate this machine's matrix products reach), ``fixed`` (a probe's fixed cost against one greedy decode, without and with
the encoder output from an ``EncoderCache``), ``costs`` (a SPES mask
and a whole ``explain`` at N = 64 against plain forwards of the model as loaded; the fixed cost of
a probe against one greedy decode), ``gradients`` (all tokens' gradient maps, batched vs Captum once per token, and their max
difference), ``convergence`` (per-token ρ of SPES maps at N masks vs a reference N with another
seed, plain vs antithetic sampling, and how much ρ(CA, SM) moves between seeds), ``monitor``
(epoch time of a short real fine-tune with and without the default monitor).
Prints a table per section and writes ``perf.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import xattn_lightning as xl
from xattn_lightning.functional import map_similarity
from xattn_lightning.saliency.perturbation import kl_per_token, slic_segments, spes_input

SECTIONS = ("spes", "encoder", "kv", "kl", "batch", "flops", "costs", "fixed", "gradients", "convergence", "monitor")


def _tiny_setup():
    """A tiny random Whisper and one 1.5-s random utterance, when no real model is given."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=80,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=150,
        max_target_positions=32,
        decoder_start_token_id=51,
        eos_token_id=50,
        pad_token_id=50,
        bos_token_id=50,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    x = torch.full((1, 16, 300), -0.5)
    x[:, :, :150] = torch.randn(1, 16, 150)
    mask = torch.zeros(1, 300, dtype=torch.long)
    mask[:, :150] = 1
    batch = {"input_features": x, "attention_mask": mask}
    targets = [[51, 52, 5, 6, 7, 8, 9, 10, 50]]
    return model, None, batch, targets, "tiny random Whisper (1.5 s)"


def _real_setup(model_path: str, manifest: str, index: int):
    from xattn_lightning.audio import read_manifest
    from xattn_lightning.loading import features_batch, load_hf_model

    model, proc = load_hf_model(model_path)
    row = read_manifest(manifest)[index]
    batch = features_batch(proc, [row])
    (e,) = xl.explain(model, batch, targets="generate", tokenizer=proc)
    return model, proc, batch, e.decoder_ids.unsqueeze(0), f"{Path(model_path).name}, {row.id}"


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_spes(model, batch, targets, n_masks: int, batch_size: int) -> dict:
    """Ours vs (a) a plain loop, one perturbed pass per mask, and (b) the limit: batched passes only."""
    adapter = xl.adapter_for(model)
    with torch.inference_mode(False), adapter.capture_context(), torch.no_grad():
        (u,) = adapter.utterances(batch)
        seq = adapter.normalize_target(torch.as_tensor(targets[0] if not torch.is_tensor(targets) else targets[0]))
        dec_in, predicted = seq[:-1], seq[1:]
        positions = (~adapter.special_mask(predicted)).nonzero().view(-1)
        feats = u.features.to(adapter.device, adapter.dtype)
        ref = adapter.forward(feats.unsqueeze(0), dec_in, output_attentions=False)
        logp = ref.logits[0].float().log_softmax(-1)

        def run(x):
            return adapter.forward(x, dec_in, output_attentions=False).logits

        run(feats.unsqueeze(0).repeat(batch_size, 1, 1))  # warm-up
        rss0 = _maxrss_mb()
        t = time.perf_counter()
        spes_input(run, feats, u.num_frames, logp, positions, n_masks=n_masks, batch_size=batch_size, seed=0)
        ours = time.perf_counter() - t
        rss_ours = _maxrss_mb() - rss0
        # (b) the limit: the same number of teacher-forced passes, batched, nothing else
        t = time.perf_counter()
        for i0 in range(0, n_masks, batch_size):
            b = min(batch_size, n_masks - i0)
            run(feats.unsqueeze(0).expand(b, -1, -1).contiguous())
        limit = time.perf_counter() - t
        # (a) plain loop: per mask, build the masked input and score it with one pass
        labels = slic_segments(feats[: u.num_frames], 400)
        t = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        num = torch.zeros(int(positions.numel()), labels.numel(), dtype=torch.float64)
        den = torch.zeros(labels.numel(), dtype=torch.float64)
        for _ in range(n_masks):
            keep_seg = torch.rand(int(labels.max()) + 1, generator=g) >= 0.5
            keep = keep_seg[labels].reshape(-1)
            x = feats.clone()
            x[: u.num_frames] = x[: u.num_frames] * keep.view(u.num_frames, -1).to(x.dtype)
            kl = kl_per_token(logp, run(x.unsqueeze(0)), positions)[0]
            for i in range(kl.numel()):  # per-token accumulation, as a straightforward port would
                num[i] += kl[i].double() * (~keep).double()
            den += (~keep).double()
        loop = time.perf_counter() - t
    return {
        "n_masks": n_masks,
        "batch_size": batch_size,
        "ours_s": ours,
        "limit_s": limit,
        "loop_s": loop,
        "ours_masks_per_s": n_masks / ours,
        "ours_over_limit": ours / limit,
        "loop_over_ours": loop / ours,
        "peak_rss_growth_mb": rss_ours,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def bench_encoder(model, batch, targets, n_masks: int) -> dict:
    res = {}
    for m, n in (("spes", n_masks), ("encoder_spes", 4 * n_masks)):
        (e,) = xl.explain(model, batch, targets=targets, methods=(m,), n_masks=n, seed=0)
        res[m] = e.results[m].seconds / e.results[m].n_masks
    return {
        "spes_s_per_mask": res["spes"],
        "encoder_spes_s_per_mask": res["encoder_spes"],
        "encoder_over_input": res["encoder_spes"] / res["spes"],
    }


def bench_kv(model, batch, targets, n_masks: int) -> dict:
    """Encoder-output saliency: the K/V shortcut (``Adapter.masked_decoder``) against the generic
    path (zero the frames, re-run the decoder), same masks, side by side."""
    from xattn_lightning.adapters import Adapter
    from xattn_lightning.saliency.perturbation import spes_encoder

    adapter = xl.adapter_for(model)
    with torch.inference_mode(False), adapter.capture_context(), torch.no_grad():
        (u,) = adapter.utterances(batch)
        seq = adapter.normalize_target(torch.as_tensor(targets[0]))
        dec_in = seq[:-1]
        positions = (~adapter.special_mask(seq[1:])).nonzero().view(-1)
        enc = adapter.encode(u.features.unsqueeze(0))
        logp = adapter.decode(enc, dec_in).logits[0].float().log_softmax(-1)
        t_enc = adapter.encoder_length(u.num_frames)
        runs = {"kv": adapter.masked_decoder(enc, dec_in), "zero": Adapter.masked_decoder(adapter, enc, dec_in)}
        res: dict = {}
        maps = {}
        for label in ("kv", "zero", "kv", "zero"):  # interleaved, best of two
            t = time.perf_counter()
            sm = spes_encoder(runs[label], t_enc, logp, positions, n_masks=n_masks, seed=0).map
            dt = (time.perf_counter() - t) / n_masks
            res[f"{label}_s_per_mask"] = min(res.get(f"{label}_s_per_mask", math.inf), dt)
            maps[label] = sm
    res["speedup"] = res["zero_s_per_mask"] / res["kv_s_per_mask"]
    res["max_abs_diff"] = float((maps["kv"] - maps["zero"]).abs().max())
    res["max_abs_value"] = float(maps["zero"].abs().max())
    return res


def _kl_by_log_softmax(logp_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The previous formula, kept as the reference: ``log_softmax`` then ``F.kl_div``."""
    lp = logits.to(logp_ref.dtype).log_softmax(-1)
    return torch.nn.functional.kl_div(lp, logp_ref.expand_as(lp), reduction="none", log_target=True).sum(-1)


def bench_kl(model, batch, targets, sizes: list[int], n_masks: int) -> dict:
    """Seconds per mask of the masked decoder pass and of the two KL formulas on its logits (real
    masks, the explained positions only), and their largest difference."""
    from xattn_lightning.saliency.perturbation import draw_keep_masks

    adapter = xl.adapter_for(model)
    rows = []
    with torch.inference_mode(False), torch.no_grad():
        (u,) = adapter.utterances(batch)
        seq = adapter.normalize_target(torch.as_tensor(targets[0]))
        dec_in = seq[:-1]
        positions = (~adapter.special_mask(seq[1:])).nonzero().view(-1)
        ref = adapter.forward(u.features.unsqueeze(0), dec_in, output_attentions=False)
        logp = ref.logits[0, positions].float().log_softmax(-1)
        run = adapter.masked_decoder(ref.encoder_out, dec_in, positions=positions)
        t_enc = adapter.encoder_length(u.num_frames)
        keep = draw_keep_masks(n_masks, t_enc, 0.5, torch.Generator().manual_seed(0))
        for bs in sizes:
            t = {"run": 0.0, "fused": 0.0, "log_softmax": 0.0}
            err = {"fused": 0.0, "log_softmax": 0.0}
            for i in range(0, n_masks, bs):
                t0 = time.perf_counter()
                z = run(keep[i : i + bs])
                t1 = time.perf_counter()
                a = kl_per_token(logp, z)
                t2 = time.perf_counter()
                b = _kl_by_log_softmax(logp, z)
                t3 = time.perf_counter()
                t["run"] += t1 - t0
                t["fused"] += t2 - t1
                t["log_softmax"] += t3 - t2
                exact = _kl_by_log_softmax(logp.double(), z.double())
                err["fused"] = max(err["fused"], float((a - exact).abs().max()))
                err["log_softmax"] = max(err["log_softmax"], float((b - exact).abs().max()))
            rows.append(
                {
                    "batch_size": bs,
                    "tokens": int(positions.numel()),
                    **{f"{k}_ms_per_mask": 1000 * v / n_masks for k, v in t.items()},
                    "kl_speedup": t["log_softmax"] / t["fused"],
                    "mask_speedup": (t["run"] + t["log_softmax"]) / (t["run"] + t["fused"]),
                    "fused_max_err_vs_float64": err["fused"],
                    "log_softmax_max_err_vs_float64": err["log_softmax"],
                }
            )
    return {"n_masks": n_masks, "rows": rows}


def bench_batch(model, batch, targets, n_masks: int, reps: int = 3) -> dict:
    """Seconds per encoder-saliency mask (whole ``encoder_spes`` computations, the masks' own seconds)
    with ``encoder_batch_size="auto"`` (off CUDA: sized by explained tokens) against a fixed 32,
    ``reps`` interleaved repetitions (best and median), and the maps' largest difference."""
    t: dict = {"auto": [], "32": []}
    maps: dict = {}
    chosen = None
    for _ in range(reps):
        for key, bs in (("32", 32), ("auto", "auto")):
            (e,) = xl.explain(
                model, batch, targets=targets, methods=("encoder_spes",), n_masks=n_masks, encoder_batch_size=bs
            )
            info = e.results["encoder_spes"]
            t[key].append(info.seconds / n_masks)
            maps[key] = e.saliency["encoder_spes"]
            if key == "auto":
                chosen = info.details["batch_size"]
    return {
        "n_masks": n_masks,
        "tokens": int(maps["auto"].shape[0]),
        "auto_batch_size": chosen,
        **{f"{k}_ms_per_mask_best": 1000 * min(v) for k, v in t.items()},
        **{f"{k}_ms_per_mask_median": 1000 * statistics.median(v) for k, v in t.items()},
        "speedup_best": min(t["32"]) / min(t["auto"]),
        "speedup_median": statistics.median(t["32"]) / statistics.median(t["auto"]),
        "max_abs_diff": float((maps["auto"] - maps["32"]).abs().max()),
    }


def bench_flops(model, batch, targets, n_masks: int = 256, probes: int = 4) -> dict:
    """GFLOP of one probe's parts (encoder, greedy decode, the attention pass, the masked decoder's
    setup and one encoder-saliency mask, of which the vocabulary projection), counted with
    ``FlopCounterMode``; the rate (GFLOP/s) of a mask batch and of the vocabulary projection alone on
    this machine; and the least time a default reading (``probes`` such probes, ``n_masks`` masks)
    needs at the mask batch's rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from xattn_lightning.saliency.perturbation import draw_keep_masks, rows_batch_size

    adapter = xl.adapter_for(model)

    def count(fn):
        with FlopCounterMode(display=False) as fc:
            out = fn()
        return fc.get_total_flops() / 1e9, out

    with torch.inference_mode(False), torch.no_grad():
        (u,) = adapter.utterances(batch)
        seq = adapter.normalize_target(torch.as_tensor(targets[0]))
        dec_in = seq[:-1]
        positions = (~adapter.special_mask(seq[1:])).nonzero().view(-1)
        enc_g, enc = count(lambda: adapter.encode(u.features.unsqueeze(0)))
        gen_g, _ = count(lambda: adapter.generate(u, encoder_out=enc))
        dec_g, _ = count(lambda: adapter.decode(enc, dec_in, output_attentions=True))
        setup_g, run = count(lambda: adapter.masked_decoder(enc, dec_in, positions=positions))
        t_enc = adapter.encoder_length(u.num_frames)
        bs = rows_batch_size(int(positions.numel()), n_masks)
        keep = draw_keep_masks(bs, t_enc, 0.7, torch.Generator().manual_seed(0))
        mask_g, logits = count(lambda: run(keep))
        mask_g /= bs
        hidden = model.get_decoder().config.d_model if hasattr(model, "get_decoder") else None
        vocab = logits.shape[-1]
        vocab_g = 2 * int(positions.numel()) * (hidden or 0) * vocab / 1e9
        run(keep)  # warm
        t = time.perf_counter()
        reps = 3
        for _ in range(reps):
            run(keep)
        mask_s = (time.perf_counter() - t) / (reps * bs)
        w = torch.randn(vocab, hidden or 1)
        h = torch.randn(bs * int(positions.numel()), hidden or 1)
        h @ w.T
        t = time.perf_counter()
        for _ in range(reps):
            h @ w.T
        proj_rate = 2 * h.shape[0] * w.shape[1] * vocab * reps / (time.perf_counter() - t) / 1e9
    fixed = enc_g + gen_g + dec_g + setup_g
    reading = probes * (fixed + n_masks * mask_g)
    return {
        "tokens": int(positions.numel()),
        "encoder_gflop": enc_g,
        "greedy_decode_gflop": gen_g,
        "attention_pass_gflop": dec_g,
        "masked_decoder_setup_gflop": setup_g,
        "mask_gflop": mask_g,
        "mask_vocabulary_share": vocab_g / mask_g if hidden else None,
        "mask_batch": bs,
        "mask_gflop_per_s": mask_g / mask_s,
        "vocabulary_projection_gflop_per_s": proj_rate,
        "reading_gflop": reading,
        "reading_masks_share": probes * n_masks * mask_g / reading,
        "reading_least_s_at_mask_rate": reading / (mask_g / mask_s),
    }


def bench_costs(model, batch, targets) -> dict:
    """A SPES mask and a whole ``explain`` at N = 64 against plain forwards of the model as the user
    loaded it; the fixed cost of a probe (``explain`` without methods) against one greedy decode."""
    adapter = xl.adapter_for(model)
    (u,) = adapter.utterances(batch)
    seq = adapter.normalize_target(torch.as_tensor(targets[0]))
    feats = u.features.unsqueeze(0)

    def plain(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                adapter.forward(feats, seq[:-1], output_attentions=False)
        return (time.perf_counter() - t) / n

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    plain(2)  # warm-up
    res: dict = {}
    for _ in range(2):  # best of two, interleaved
        res["plain_forward_s"] = min(res.get("plain_forward_s", math.inf), plain(8))
        (e,) = xl.explain(model, batch, targets=[seq.tolist()], methods=("spes",), n_masks=64, seed=0)
        res["spes_s_per_mask"] = min(res.get("spes_s_per_mask", math.inf), e.results["spes"].seconds / 64)
        res["explain_spes64_s"] = min(
            res.get("explain_spes64_s", math.inf),
            timed(lambda: xl.explain(model, batch, targets=[seq.tolist()], methods=("spes",), n_masks=64, seed=0)),
        )
        res["greedy_decode_s"] = min(
            res.get("greedy_decode_s", math.inf),
            timed(lambda: adapter.generate(u)),
        )
        res["fixed_cost_s"] = min(
            res.get("fixed_cost_s", math.inf), timed(lambda: xl.explain(model, batch, targets="generate"))
        )
    res["spes_mask_over_plain"] = res["spes_s_per_mask"] / res["plain_forward_s"]
    res["explain64_over_64_plain"] = res["explain_spes64_s"] / (64 * res["plain_forward_s"])
    res["fixed_over_greedy"] = res["fixed_cost_s"] / res["greedy_decode_s"]
    return res


def bench_fixed(model, batch, reps: int = 3) -> dict:
    """A probe's fixed cost (``explain`` without saliency) against one greedy decode, and the same
    with the encoder output taken from an :class:`~xattn_lightning.EncoderCache` (a frozen
    encoder from the second reading on); best of ``reps``, interleaved."""
    adapter = xl.adapter_for(model)
    (u,) = adapter.utterances(batch)
    cache = xl.EncoderCache()
    xl.explain(model, batch, targets="generate", encoder_cache=cache)  # warm-up, fills the cache
    fns = {
        "greedy_decode_s": lambda: adapter.generate(u),
        "fixed_cost_s": lambda: xl.explain(model, batch, targets="generate"),
        "fixed_cost_cached_s": lambda: xl.explain(model, batch, targets="generate", encoder_cache=cache),
    }
    res = dict.fromkeys(fns, math.inf)
    with torch.no_grad():
        for _ in range(reps):
            for key, fn in fns.items():
                t = time.perf_counter()
                fn()
                res[key] = min(res[key], time.perf_counter() - t)
    res["fixed_over_greedy"] = res["fixed_cost_s"] / res["greedy_decode_s"]
    res["fixed_cached_over_greedy"] = res["fixed_cost_cached_s"] / res["greedy_decode_s"]
    res["cache_hits"] = cache.hits
    return res


def bench_gradients(model, batch, targets, n_steps: int) -> dict:
    out = {}
    for m in ("saliency", "integrated_gradients", "encoder_saliency"):
        times = {}
        maps = {}
        for engine in ("captum", "batched", "captum", "batched"):  # interleaved, best of two
            t = time.perf_counter()
            (e,) = xl.explain(model, batch, targets=targets, methods=(m,), n_steps=n_steps, gradient_engine=engine)
            dt = time.perf_counter() - t
            times[engine] = min(times.get(engine, math.inf), dt)
            maps[engine] = e.saliency[m]
        diff = float((maps["captum"] - maps["batched"]).abs().max() / maps["captum"].abs().max().clamp(min=1e-30))
        out[m] = {
            "tokens": int(maps["captum"].shape[0]),
            "captum_s": times["captum"],
            "batched_s": times["batched"],
            "speedup": times["captum"] / times["batched"],
            "max_rel_diff": diff,
        }
    return out


def bench_convergence(model, batch, targets, ns: list[int], ref_n: int, methods: list[str], seeds: int) -> dict:
    out: dict = {}
    for m in methods:
        (ref,) = xl.explain(model, batch, targets=targets, methods=(m,), n_masks=ref_n, seed=1000)
        ref_map = ref.pooled(m)
        rows = []
        for n in ns:
            row: dict = {"n": n}
            samplings = ("plain", "antithetic") if m == "spes" else ("plain",)  # antithetic needs p = 0.5
            for sampling in samplings:
                rhos, agrees, corrected = [], [], []
                for s in range(seeds):
                    (e,) = xl.explain(model, batch, targets=targets, methods=(m,), n_masks=n, seed=s, sampling=sampling)
                    rhos.append(map_similarity(e.pooled(m), ref_map))
                    agrees.append(e.agreement(m))
                    corrected.append(e.agreement(m, corrected=True))
                row[f"{sampling}_per_token_rho"] = statistics.mean(rhos)
                row[f"{sampling}_agreement_spread"] = max(agrees) - min(agrees)
                row[f"{sampling}_agreement_mean"] = statistics.mean(agrees)
                ok = [c for c in corrected if not math.isnan(c)]
                row[f"{sampling}_corrected_mean"] = statistics.mean(ok) if ok else math.nan
                row[f"{sampling}_corrected_spread"] = (max(ok) - min(ok)) if len(ok) > 1 else math.nan
            rows.append(row)
            print(f"  convergence {m} N={n}: {row}", file=sys.stderr, flush=True)
        hit = [r["n"] for r in rows if r["plain_per_token_rho"] >= 0.9]
        hit_a = [r["n"] for r in rows if r.get("antithetic_per_token_rho", 0) >= 0.9]
        out[m] = {
            "reference_n": ref_n,
            "reference_agreement": ref.agreement(m),
            "reference_corrected": ref.agreement(m, corrected=True),
            "rows": rows,
            "masks_for_rho_0.9_plain": min(hit) if hit else None,
            "masks_for_rho_0.9_antithetic": min(hit_a) if hit_a else None,
        }
    return out


def bench_monitor(
    model_path: str | None,
    manifest: str | None,
    steps: int,
    n_masks: int,
    pairs: int = 2,
    freeze_encoder: bool = False,
    epochs: int = 1,
) -> dict:
    """Fine-tune time with and without the default monitor (examples/finetune_whisper.py, shortened),
    ``pairs`` interleaved pairs of runs. ``overhead`` compares the fastest run of each kind,
    ``overhead_median`` is the median of the pairs' ratios and ``reading_share`` the monitor's own
    seconds over the fastest run without it (what a reading costs when nothing else moves).
    ``freeze_encoder`` fine-tunes the decoder only (from the second reading on, the monitor takes the
    probes' encoder outputs from its cache); ``readings_s`` lists every reading's seconds."""
    import importlib.util

    if not model_path or not manifest:
        return {"skipped": "needs --model and --manifest"}
    spec = importlib.util.spec_from_file_location(
        "ft", Path(__file__).resolve().parent.parent / "examples" / "finetune_whisper.py"
    )
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    import lightning.pytorch as pl

    res = {}
    labels = [
        (f"{kind}{'' if k == 0 else f'_{k + 1}'}", kind == "with") for k in range(pairs) for kind in ("without", "with")
    ]
    for label, monitor in labels:
        args = [
            "--model",
            model_path,
            "--manifest",
            manifest,
            "--epochs",
            str(epochs),
            "--limit-train-batches",
            str(steps),
            "--limit-val-batches",
            "1",
            "--batch-size",
            "4",
            "--num-probes",
            "4",
            "--n-masks",
            str(n_masks),
            "--out",
            f"/tmp/xl_bench_monitor_{label}",
            "--no-wandb",
            "--max-overhead",
            "none",  # every reading runs: skipped readings are no saving
        ]
        if not monitor:
            args += ["--methods", "encoder_spes"]
        if freeze_encoder:
            args += ["--freeze-encoder"]
        t = time.perf_counter()
        if monitor:
            out = ft.main(args)
        else:
            orig = ft.XAttnSaliencyMonitor

            class Off(pl.Callback):
                history: list = []
                head_ranking: dict = {}

                def __init__(self, *a, **k):
                    pass

            ft.XAttnSaliencyMonitor = Off
            try:
                out = ft.main(args)
            finally:
                ft.XAttnSaliencyMonitor = orig
        res[label] = time.perf_counter() - t
        if monitor:
            res[f"{label}_agreement"] = out["history"][-1].get("xattn/encoder_spes/pearson")
            res[f"{label}_monitor_s"] = out["history"][-1].get("xattn/seconds")
            res[f"{label}_readings_s"] = [h.get("xattn/seconds") for h in out["history"]]
    without = [res[label] for label, monitor in labels if not monitor]
    with_ = [res[label] for label, monitor in labels if monitor]
    res["overhead"] = min(with_) / min(without) - 1.0
    res["overhead_median"] = statistics.median(w / wo - 1.0 for w, wo in zip(with_, without))
    res["reading_share"] = statistics.fmean(res[f"{label}_monitor_s"] for label, m in labels if m) / min(without)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--manifest", default=os.environ.get("XL_ESPEAK_MANIFEST"))
    ap.add_argument("--utterance", type=int, default=0)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--n-masks", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-steps", type=int, default=16)
    ap.add_argument("--convergence-ns", default="64,128,256,512,1000")
    ap.add_argument("--convergence-ref", type=int, default=4000)
    ap.add_argument("--convergence-methods", default="encoder_spes")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--monitor-steps", type=int, default=6)
    ap.add_argument("--monitor-pairs", type=int, default=2, help="interleaved runs without/with the monitor")
    ap.add_argument("--monitor-epochs", type=int, default=1)
    ap.add_argument("--monitor-freeze-encoder", action="store_true", help="fine-tune the decoder only")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in only:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    if args.model and args.manifest:
        model, _, batch, targets, what = _real_setup(args.model, args.manifest, args.utterance)
    else:
        model, _, batch, targets, what = _tiny_setup()
    report: dict = {
        "setup": what,
        "device": f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "argv": argv or sys.argv[1:],
    }
    print(f"# {what} on {report['device']}")
    if "spes" in only:
        r = report["spes"] = bench_spes(model, batch, targets, args.n_masks, args.batch_size)
        print(
            f"SPES N={r['n_masks']}: ours {r['ours_s']:.2f} s ({r['ours_masks_per_s']:.2f} masks/s), limit "
            f"{r['limit_s']:.2f} s, loop {r['loop_s']:.2f} s -> ours/limit {r['ours_over_limit']:.2f}x, "
            f"loop/ours {r['loop_over_ours']:.2f}x, peak RSS +{r['peak_rss_growth_mb']:.0f} MB"
        )
    if "encoder" in only:
        r = report["encoder"] = bench_encoder(model, batch, targets, args.n_masks)
        print(
            f"per mask: input SPES {r['spes_s_per_mask']:.4f} s, encoder SPES {r['encoder_spes_s_per_mask']:.4f} s "
            f"-> {r['encoder_over_input']:.3f}x"
        )
    if "kv" in only:
        r = report["kv"] = bench_kv(model, batch, targets, 4 * args.n_masks)
        print(
            f"encoder saliency per mask: K/V shortcut {r['kv_s_per_mask']:.4f} s, zeroed frames + decoder "
            f"{r['zero_s_per_mask']:.4f} s -> {r['speedup']:.2f}x; max |diff| {r['max_abs_diff']:.1e} "
            f"(max |value| {r['max_abs_value']:.1e})"
        )
    if "kl" in only:
        r = report["kl"] = bench_kl(model, batch, targets, [8, 32, 64], 8 * args.n_masks)
        for row in r["rows"]:
            print(
                f"KL, batch {row['batch_size']}, {row['tokens']} tokens: decoder pass {row['run_ms_per_mask']:.2f} ms/mask, "
                f"KL one pass {row['fused_ms_per_mask']:.2f} vs log_softmax+kl_div {row['log_softmax_ms_per_mask']:.2f} "
                f"-> {row['kl_speedup']:.1f}x (a whole mask {row['mask_speedup']:.2f}x); "
                f"max error against float64: one pass {row['fused_max_err_vs_float64']:.1e}, "
                f"log_softmax {row['log_softmax_max_err_vs_float64']:.1e}"
            )
    if "batch" in only:
        r = report["batch"] = bench_batch(model, batch, targets, 8 * args.n_masks)
        print(
            f"encoder saliency, {r['tokens']} tokens, N={r['n_masks']}: auto (batch {r['auto_batch_size']}) "
            f"{r['auto_ms_per_mask_best']:.2f} ms/mask vs batch 32 {r['32_ms_per_mask_best']:.2f} (best of 3) -> "
            f"{r['speedup_best']:.2f}x (median {r['speedup_median']:.2f}x); max |diff| {r['max_abs_diff']:.1e}"
        )
    if "flops" in only:
        r = report["flops"] = bench_flops(model, batch, targets)
        print(
            f"GFLOP, {r['tokens']} tokens: encoder {r['encoder_gflop']:.1f}, greedy decode {r['greedy_decode_gflop']:.1f}, "
            f"attention pass {r['attention_pass_gflop']:.1f}, masked-decoder setup {r['masked_decoder_setup_gflop']:.1f}, "
            f"a mask {r['mask_gflop']:.3f} (vocabulary {100 * (r['mask_vocabulary_share'] or 0):.0f} %); masks run at "
            f"{r['mask_gflop_per_s']:.0f} GFLOP/s (vocabulary projection alone {r['vocabulary_projection_gflop_per_s']:.0f}); "
            f"a 4-probe reading of such probes: {r['reading_gflop']:.0f} GFLOP ({100 * r['reading_masks_share']:.0f} % masks), "
            f"at least {r['reading_least_s_at_mask_rate']:.1f} s at the masks' rate"
        )
    if "costs" in only:
        r = report["costs"] = bench_costs(model, batch, targets)
        print(
            f"plain forward {r['plain_forward_s']:.3f} s; SPES mask {r['spes_s_per_mask']:.3f} s "
            f"({r['spes_mask_over_plain']:.2f}x); explain SPES N=64 {r['explain_spes64_s']:.2f} s "
            f"({r['explain64_over_64_plain']:.2f}x 64 plain); fixed cost {r['fixed_cost_s']:.2f} s vs greedy decode "
            f"{r['greedy_decode_s']:.2f} s ({r['fixed_over_greedy']:.2f}x)"
        )
    if "fixed" in only:
        r = report["fixed"] = bench_fixed(model, batch)
        print(
            f"fixed cost of a probe {r['fixed_cost_s']:.3f} s ({r['fixed_over_greedy']:.2f}x a greedy decode of "
            f"{r['greedy_decode_s']:.3f} s); with the encoder output cached {r['fixed_cost_cached_s']:.3f} s "
            f"({r['fixed_cached_over_greedy']:.2f}x)"
        )
    if "gradients" in only:
        r = report["gradients"] = bench_gradients(model, batch, targets, args.n_steps)
        for m, v in r.items():
            print(
                f"{m}: {v['tokens']} tokens, Captum per token {v['captum_s']:.2f} s, batched {v['batched_s']:.2f} s "
                f"-> {v['speedup']:.2f}x, max rel diff {v['max_rel_diff']:.1e}"
            )
    if "convergence" in only:
        ns = [int(x) for x in args.convergence_ns.split(",")]
        methods = [m.strip() for m in args.convergence_methods.split(",")]
        r = report["convergence"] = bench_convergence(
            model, batch, targets, ns, args.convergence_ref, methods, args.seeds
        )
        for m, v in r.items():
            print(
                f"{m} (reference N={v['reference_n']}: ρ(CA,SM) {v['reference_agreement']:.3f}, corrected "
                f"{v['reference_corrected']:.3f}). N | per-token ρ to the reference (plain / antithetic) | ρ(CA,SM) "
                f"mean, spread over {args.seeds} seeds | corrected ρ mean, spread"
            )
            for row in v["rows"]:
                anti = row.get("antithetic_per_token_rho", math.nan)
                print(
                    f"  {row['n']:>5} | {row['plain_per_token_rho']:.3f} / {anti:.3f} | "
                    f"{row['plain_agreement_mean']:.3f}, {row['plain_agreement_spread']:.3f} | "
                    f"{row['plain_corrected_mean']:.3f}, {row['plain_corrected_spread']:.3f}"
                )
            print(
                f"  masks for per-token ρ >= 0.9: plain {v['masks_for_rho_0.9_plain']}, "
                f"antithetic {v['masks_for_rho_0.9_antithetic']}"
            )
    if "monitor" in only:
        r = report["monitor"] = bench_monitor(
            args.model,
            args.manifest,
            args.monitor_steps,
            256,
            args.monitor_pairs,
            args.monitor_freeze_encoder,
            args.monitor_epochs,
        )
        if "skipped" not in r:
            print(
                f"fine-tune: overhead {100 * r['overhead']:.1f} % (fastest runs), {100 * r['overhead_median']:.1f} % "
                f"(median of {args.monitor_pairs} pairs); readings {100 * r['reading_share']:.1f} % of the fastest run "
                f"without the monitor. Runs: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in r.items() if isinstance(v, float) and k.startswith("with"))
                + "; readings "
                + ", ".join(
                    f"{k[:-11]}: {[round(x, 2) for x in v]} s" for k, v in r.items() if k.endswith("_readings_s")
                )
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
