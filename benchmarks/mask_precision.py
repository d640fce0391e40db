"""Would a masked pass in lower precision pay on this CPU? (issue 34, levers tried after the bfloat16 vocabulary)

Each probe is read with ``encoder_spes`` (the same seeded masks every time) four ways, interleaved per probe:

- ``exact``: every product in float32 (``vocabulary="exact"``);
- ``bf16_vocabulary``: the default on a CPU with AMX (``vocabulary="bf16"``: the output head in bfloat16, each
  position's 16 most probable tokens exact);
- ``bf16_linears``: the same, and every other linear layer of the decoder in bfloat16 too, with weights cast once
  (the inputs cast to bfloat16, the outputs back to float32: the residual stream, the norms, the softmaxes and the
  attention products stay float32). A prototype patched in here, not an option of the package;
- ``autocast``: ``autocast="bf16"`` (the whole masked pass under ``torch.autocast``).

``--openai``: the same weights as an openai-whisper model (built from the Hugging Face one, nothing downloaded),
``exact`` and ``bf16_vocabulary`` only (its output head is the tied token embedding).

Reported: milliseconds per mask of the mask loops (``SaliencyResult.seconds``), the per-token Pearson of each map
with the exact one (median, minimum), and the mean ``pearson_corrected`` and reliability of each.

    python -m benchmarks.mask_precision --model $XL_WHISPER_PATH --manifest probes.tsv --n-masks 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.functional import per_token_correlation
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.scores import probe_scores

VARIANTS = {
    "exact": {"vocabulary": "exact"},
    "bf16_vocabulary": {"vocabulary": "bf16"},
    "bf16_linears": {"vocabulary": "bf16"},
    "autocast": {"vocabulary": "exact", "autocast": "bf16"},
}


def with_bf16_linears(model: nn.Module, adapter: object) -> Callable[[bool], None]:
    """Patch ``adapter``'s class so that its masked passes run the decoder's linear layers (not the output head) in
    bfloat16 while the returned switch is on."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    linears = [m for m in model.get_decoder().modules() if isinstance(m, nn.Linear) and m is not head]  # type: ignore[operator]
    weights = {
        id(m): (m.weight.detach().bfloat16(), None if m.bias is None else m.bias.detach().bfloat16()) for m in linears
    }
    cls = type(adapter)
    base = cls.masked_decoder
    on = [False]

    def masked_decoder(self, encoder_out, decoder_ids, positions=None):  # type: ignore[no-untyped-def]
        run = base(self, encoder_out, decoder_ids, positions)
        if not on[0]:
            return run

        def run_bf16(keep: torch.Tensor) -> torch.Tensor:
            for m in linears:
                w, b = weights[id(m)]
                m.forward = lambda x, w=w, b=b: F.linear(x.to(torch.bfloat16), w, b).float()  # type: ignore[method-assign]
            try:
                return run(keep)
            finally:
                for m in linears:
                    del m.forward

        return run_bf16

    cls.masked_decoder = masked_decoder  # type: ignore[method-assign]

    def switch(value: bool) -> None:
        on[0] = value

    return switch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--manifest", required=True, help="the probes (id audio text)")
    ap.add_argument("--n-masks", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the probes (timing only; maps are seeded)")
    ap.add_argument("--openai", action="store_true", help="the same weights as an openai-whisper model")
    ap.add_argument("--device", default="cpu", help="e.g. cuda: the same comparison on an accelerator")
    ap.add_argument("--out", default="benchmarks/results/mask_precision_cpu.json")
    args = ap.parse_args(argv)
    if not args.model:
        ap.error("needs --model (or XL_WHISPER_PATH)")
    model, proc = load_hf_model(args.model, device=args.device)
    variants = VARIANTS
    if args.openai:
        from xattn_lightning.adapters.openai_whisper import openai_whisper_from_hf

        model = openai_whisper_from_hf(model).to(args.device).eval()
        variants = {k: VARIANTS[k] for k in ("exact", "bf16_vocabulary")}

        def switch(value: bool) -> None:
            pass
    else:
        switch = with_bf16_linears(model, xl.adapter_for(model, proc))
    rows = read_manifest(args.manifest)
    seconds = dict.fromkeys(variants, 0.0)
    maps: dict[tuple[str, str], torch.Tensor] = {}
    scores: dict[str, list] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for row in rows:
            batch = features_batch(proc, [row])
            for name, kw in variants.items():
                switch(name == "bf16_linears")
                tok = None if args.openai else proc
                (e,) = xl.explain(model, batch, methods=("encoder_spes",), n_masks=args.n_masks, tokenizer=tok, **kw)
                seconds[name] += float(e.results["encoder_spes"].seconds)
                if rep == 0:
                    maps[(row.id, name)] = e.saliency["encoder_spes"]
                    scores[name].append(probe_scores(e, ("encoder_spes",), ("pearson",), probe_id=row.id))
            print(f"  round {rep} {row.id}", flush=True)
    switch(False)
    masks = args.n_masks * len(rows) * args.repeats
    report: dict = {"argv": argv or sys.argv[1:], "probes": [r.id for r in rows], "variants": {}}
    for name in variants:
        rho = torch.cat(
            [per_token_correlation(maps[(r.id, "exact")], maps[(r.id, name)], "pearson", False) for r in rows]
        )
        rho = rho[~rho.isnan()]
        ms = [s.methods["encoder_spes"] for s in scores[name]]
        report["variants"][name] = {
            "ms_per_mask": 1000 * seconds[name] / masks,
            "per_token_pearson_median": float(rho.median()),
            "per_token_pearson_min": float(rho.min()),
            "pearson_corrected_mean": statistics.fmean(m.pearson_corrected for m in ms),
            "reliability_mean": statistics.fmean(m.reliability for m in ms),
        }
    print(json.dumps(report["variants"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
