"""Regenerate the README's pictures into docs/images/.

    python docs/make_figures.py [--model WHISPER_DIR --manifest MANIFEST.tsv]

- ``demo_heatmaps.png``: a demo probe after training (spectrogram, cross-attention, SM_X, SM_H).
- ``wandb_layout.png``: the W&B panel layout of a monitor run, drawn from the demo run's own logged
  data (the sections and keys as they appear in the W&B workspace; not a screenshot).
- ``whisper_heatmaps.png`` (with ``--model``/``--manifest``): Whisper tiny.en on a real utterance,
  SPES N = 256 and encoder SPES N = 1000.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from matplotlib.figure import Figure

import xattn_lightning as xl
from xattn_lightning.cli import run_demo
from xattn_lightning.viz import figure_to_array, grid_figure, heatmap_figure
from xattn_lightning.viz.heatmap import save_figure

OUT = Path(__file__).resolve().parent / "images"


def wandb_layout(monitor) -> Figure:
    """Sections of the W&B workspace of a monitor run, filled with this run's data."""
    hist = monitor.history
    steps = [h["step"] for h in hist]
    fig = Figure(figsize=(13, 8.5), dpi=80)
    gs = fig.add_gridspec(3, 4, height_ratios=[1, 1.5, 1.0])
    fig.suptitle("W&B workspace of a monitor run (layout drawn from the demo run's logged data)", fontsize=11)
    panels = [
        ("xattn/spes/pearson", "xattn/spes/spearman"),
        ("xattn/encoder_spes/pearson", "xattn/encoder_spes/spearman"),
        ("xattn/context_mixing_gap",),
        tuple(k for k in hist[-1] if k.startswith("xattn/spes/pearson_layer")) + ("xattn/spes/pearson_best_head",),
    ]
    for i, keys in enumerate(panels):
        ax = fig.add_subplot(gs[0, i])
        for k in keys:
            ax.plot(steps, [h.get(k) for h in hist], marker="o", ms=3, label=k.replace("xattn/", ""))
        ax.set_title("section xattn: " + ("per layer" if i == 3 else keys[0].replace("xattn/", "")), fontsize=8)
        ax.set_xlabel("trainer/global_step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    e = monitor.last_explanations[0]
    ax = fig.add_subplot(gs[1, :3])
    ax.imshow(figure_to_array(heatmap_figure(e, monitor.config.methods, title=f"{monitor.probe_ids[0]}")))
    ax.set_title("media: xattn/heatmaps (one image per probe, step slider)", fontsize=8)
    ax.axis("off")
    ax = fig.add_subplot(gs[1, 3])
    ax.imshow(figure_to_array(grid_figure(monitor.head_ranking and _grid(monitor), "ρ(CA, spes) per layer × head")))
    ax.set_title("media: xattn/head_grid", fontsize=8)
    ax.axis("off")
    ax = fig.add_subplot(gs[2, :])
    ax.axis("off")
    cols = ["id", "hypothesis", "spes/pearson", "encoder_spes/pearson", "image"]
    rows = []
    for pid, ex in zip(monitor.probe_ids, monitor.last_explanations):
        rows.append(
            [
                pid,
                " ".join(ex.tokens or [str(int(t)) for t in ex.token_ids])[:40],
                f"{ex.agreement('spes'):+.3f}",
                f"{ex.agreement('encoder_spes'):+.3f}",
                "▦",
            ]
        )
    table = ax.table(cellText=rows, colLabels=cols, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    ax.set_title("tables: xattn/probes (one row per probe)   and   xattn/head_ranking (all heads by ρ)", fontsize=8)
    fig.tight_layout()
    return fig


def _grid(monitor):
    rk = monitor.head_ranking["spes"]
    layers = 1 + max(li for li, _, _ in rk)
    heads = 1 + max(hi for _, hi, _ in rk)
    grid = [[float("nan")] * heads for _ in range(layers)]
    for li, hi, r in rk:
        grid[li][hi] = r
    return grid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--manifest", default=os.environ.get("XL_ESPEAK_MANIFEST"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo_args = argparse.Namespace(
        epochs=8, train_size=512, n_masks=128, seed=0, out="/tmp/xl_figures_demo", no_wandb=True
    )
    monitor, _, _ = run_demo(demo_args)
    e = monitor.last_explanations[0]
    save_figure(
        heatmap_figure(e, monitor.config.methods, title=f"demo probe {monitor.probe_ids[0]}, after training"),
        out / "demo_heatmaps.png",
    )
    save_figure(wandb_layout(monitor), out / "wandb_layout.png")
    if args.model and args.manifest:
        from xattn_lightning.audio import read_manifest
        from xattn_lightning.loading import features_batch, load_hf_model

        model, proc = load_hf_model(args.model)
        row = read_manifest(args.manifest)[0]
        batch = features_batch(proc, [row])
        (e,) = xl.explain(model, batch, targets="generate", tokenizer=proc, methods=("spes",), n_masks=256)
        (eh,) = xl.explain(
            model, batch, targets=e.decoder_ids.unsqueeze(0), tokenizer=proc, methods=("encoder_spes",), n_masks=1000
        )
        e.results.update(eh.results)
        save_figure(
            heatmap_figure(e, ("spes", "encoder_spes"), title=f"Whisper tiny.en, {row.id}: {e.text}"),
            out / "whisper_heatmaps.png",
        )
    print(f"figures in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
