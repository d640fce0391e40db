"""Heatmaps of one explanation: spectrogram, cross-attention and saliency, tokens × seconds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from xattn_lightning.explain import Explanation
from xattn_lightning.functional import framewise_zscore, tokenwise_zscore
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an ``uint8`` RGB array ``[H, W, 3]``; the figure is released."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return img


def heatmap_figure(
    e: Explanation,
    methods: Sequence[str],
    title: str = "",
    frame_rate: float | None = None,
    normalize: bool = True,
    scores: Mapping[str, float] | None = None,
    layers: LayerSpec = None,
    heads: HeadSpec = None,
) -> Figure:
    """Spectrogram on top, then cross-attention (averaged over ``layers`` × ``heads``, default all)
    and each method's saliency at encoder resolution; token labels on the y axis, seconds on the x
    axis, ρ in titles.

    ``scores`` (method → ρ) are the numbers already computed for this utterance (the monitor's and
    ``compare``'s); a method missing from it is scored here with :meth:`Explanation.agreement`.

    >>> import torch
    >>> from xattn_lightning.explain import Explanation
    >>> e = Explanation(torch.tensor([5, 6]), ["a", "b"], torch.rand(1, 1, 2, 4), 2, torch.rand(8, 3),
    ...                 torch.zeros(2), torch.tensor([1, 5, 6, 2]))
    >>> heatmap_figure(e, []).axes.__len__()
    2
    """
    panels = 2 + len(methods)
    fig = Figure(figsize=(9, 1.6 + 1.4 * panels + 0.12 * len(e.token_ids) * (panels - 1)), dpi=80)
    heights = [1.2] + [max(1.0, 0.18 * len(e.token_ids))] * (panels - 1)
    axes = fig.subplots(panels, 1, gridspec_kw={"height_ratios": heights})
    seconds = e.num_frames / (frame_rate or e.frame_rate)
    ext = (0, seconds, len(e.token_ids) - 0.5, -0.5)  # row 0 (first token) on top
    axes[0].imshow(
        e.features.T.numpy(), aspect="auto", origin="lower", extent=(0, seconds, 0, e.features.shape[1]), cmap="magma"
    )
    axes[0].set_ylabel("mel bin")
    axes[0].set_title(title or "input spectrogram", fontsize=9)
    labels = e.tokens or [str(int(t)) for t in e.token_ids]
    which = "layers × heads" if layers is None and heads is None else "selected heads"
    maps: list[tuple[str, Tensor, str | None]] = [
        (f"cross-attention (mean of {which})", e.attention(layers, heads), None)
    ]
    maps += [(m, e.pooled(m), m) for m in methods]
    for ax, (name, mat, method) in zip(axes[1:], maps):
        shown = mat
        if normalize:
            shown = framewise_zscore(mat) if method is None else tokenwise_zscore(mat)
        ax.imshow(shown.numpy(), aspect="auto", origin="upper", extent=ext, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        rho = "" if method is None else f"  ρ={_score(e, method, scores, layers, heads):+.3f}"
        ax.set_title(f"{name}{rho}", fontsize=9)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    return fig


def grid_figure(grid: Sequence[Sequence[float]], title: str = "ρ per layer × head") -> Figure:
    """A layer × head grid of ρ values with the numbers written in the cells."""
    arr = np.asarray(grid, dtype=float)
    fig = Figure(figsize=(1.2 + 0.6 * arr.shape[1], 1.0 + 0.5 * arr.shape[0]), dpi=80)
    ax = fig.subplots()
    im = ax.imshow(arr, cmap="RdBu_r", vmin=-1, vmax=1)
    for (li, hi), v in np.ndenumerate(arr):
        ax.text(hi, li, "nan" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(arr.shape[1]))
    ax.set_yticks(range(arr.shape[0]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def layers_figure(series: Mapping[str, Sequence[float]], title: str = "ρ per layer") -> Figure:
    """One line per checkpoint: ρ of each layer's head-mean attention."""
    fig = Figure(figsize=(6, 3.2), dpi=90)
    ax = fig.subplots()
    for name, vals in series.items():
        ax.plot(range(len(vals)), vals, marker="o", label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("ρ")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _score(
    e: Explanation, method: str, scores: Mapping[str, float] | None, layers: LayerSpec = None, heads: HeadSpec = None
) -> float:
    if scores is not None and method in scores:
        return float(scores[method])
    return e.agreement(method, layers=layers, heads=heads)


def comparison_heatmaps(
    exps: dict[str, Explanation],
    methods: Sequence[str],
    title: str = "",
    frame_rate: float | None = None,
    scores: Mapping[str, Mapping[str, float]] | None = None,
) -> Figure:
    """The same utterance through several checkpoints: one column per checkpoint, rows =
    cross-attention and each method's saliency (normalised as in the agreement).

    ``scores``: checkpoint name → method → ρ already computed (missing ones are computed here)."""
    names = list(exps)
    rows = 1 + len(methods)
    n_tok = max(len(e.token_ids) for e in exps.values())
    fig = Figure(figsize=(4.2 * len(names), 0.8 + rows * max(1.6, 0.16 * n_tok)), dpi=80)
    axes = fig.subplots(rows, len(names), squeeze=False)
    for c, name in enumerate(names):
        e = exps[name]
        seconds = e.num_frames / (frame_rate or e.frame_rate)
        ext = (0, seconds, len(e.token_ids) - 0.5, -0.5)
        labels = e.tokens or [str(int(t)) for t in e.token_ids]
        panels = [("cross-attention", framewise_zscore(e.attention()))]
        own = (scores or {}).get(name)
        panels += [(f"{m}  ρ={_score(e, m, own):+.3f}", tokenwise_zscore(e.pooled(m))) for m in methods]
        for r, (label, mat) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(mat.numpy(), aspect="auto", extent=ext, cmap="viridis", interpolation="nearest")
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels, fontsize=6)
            ax.set_title(f"{name}\n{label}" if r == 0 else label, fontsize=8)
        axes[-1, c].set_xlabel("seconds")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def figure_to_png(fig: Figure) -> bytes:
    """Render ``fig`` as PNG bytes and release it (the one way figures become files or pages)."""
    import io

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    fig.clear()
    return buf.getvalue()


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` and release it; returns the path."""
    with open(path, "wb") as fh:
        fh.write(figure_to_png(fig))
    return path


def history_figure(
    history: Sequence[dict], keys: Sequence[str], ylabel: str = "ρ(cross-attention, saliency)"
) -> Figure:
    """Monitor readings over training: one line per scalar key, by epoch."""
    fig = Figure(figsize=(7, 3.5), dpi=90)
    ax = fig.subplots()
    for key in keys:
        ax.plot([h["epoch"] + 1 for h in history], [h.get(key, float("nan")) for h in history], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
