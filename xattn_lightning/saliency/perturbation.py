"""Perturbation saliency: SPES over the spectrogram (SM_X) and frame occlusion of the encoder output (SM_H).

Both run teacher-forced on the explained decoder sequence, so one perturbed pass scores every
token. Masks, KL and accumulation are computed on the model's device, batched over masks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from xattn_lightning.adapters.base import DEFAULT_FRAME_RATE
from xattn_lightning.errors import XAttnError
from xattn_lightning.functional.pooling import check_smoothing, smooth_frames
from xattn_lightning.saliency.options import DEFAULT_N_MASKS, SAMPLINGS, EncoderSpesOptions, SpesOptions
from xattn_lightning.saliency.result import SaliencyResult

#: SPES' three SLIC granularities: segments per 500 input frames (5 s at a 10 ms hop)
DEFAULT_SEGMENTS = SpesOptions.scales
REFERENCE_FRAMES = 500
#: segment counts grow with duration up to this many frames (7.5 s), then stay fixed
MAX_SCALED_FRAMES = 750


def segment_counts(
    num_frames: int, scales: Sequence[int] = DEFAULT_SEGMENTS, frame_rate: float | None = None
) -> list[int]:
    """SLIC segment count per scale for an utterance of ``num_frames``, scaled with duration
    up to 7.5 s (paper §6.2). ``frame_rate`` is input frames per second (100 for a 10-ms hop).

    >>> segment_counts(250)
    [1000, 1250, 1500]
    >>> segment_counts(2000)
    [3000, 3750, 4500]
    """
    seconds = min(num_frames / (frame_rate or DEFAULT_FRAME_RATE), MAX_SCALED_FRAMES / 100.0)
    return [max(2, int(round(s * seconds / (REFERENCE_FRAMES / 100.0)))) for s in scales]


def slic_segments(x: Tensor, n_segments: int, compactness: float = 0.1, sigma: float = 0.0) -> Tensor:
    """SLIC segmentation (scikit-image) of a min-max normalised ``[T, F]`` spectrogram.

    Returns ``LongTensor[T, F]`` labels ``0..K-1`` (consecutive).
    """
    from skimage.segmentation import slic

    img = x.detach().float().cpu().numpy()
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    labels = slic(
        img.astype(np.float64),
        n_segments=n_segments,
        compactness=compactness,
        sigma=sigma,
        channel_axis=None,
        start_label=0,
        enforce_connectivity=True,
    )
    _, inv = np.unique(labels, return_inverse=True)
    return torch.from_numpy(inv.reshape(labels.shape).astype(np.int64))


#: The logits are reduced a few mask rows at a time, at most this many elements per chunk. On CPU
#: (2 MiB in float32) a small chunk stays in cache, while a fresh tensor of a whole mask batch's logits
#: (tens of MiB) is served by ``mmap`` and costs more in page faults than the arithmetic on it; on an
#: accelerator (1 GiB) the chunk only bounds the temporaries of a large automatic batch.
KL_CHUNK_ELEMENTS = {"cpu": 2**19, "cuda": 2**28}


class PartlyExactLogits(NamedTuple):
    """Logits ``[B, P, V]`` in bfloat16 (``approx``) but for the ``top`` ``[P, k]`` tokens of each position, whose
    float32 values are ``exact`` ``[B, P, k]`` (``vocabulary="bf16"``, :mod:`~xattn_lightning.saliency.vocabulary`).
    :func:`kl_per_token` puts the exact values in a few rows at a time, so the whole batch's logits are never
    held in float32."""

    approx: Tensor
    top: Tensor
    exact: Tensor


def kl_per_token(logp_ref: Tensor, logits: Tensor | PartlyExactLogits, positions: Tensor | None = None) -> Tensor:
    """KL(P_ref ‖ P_pert) at the explained decoder ``positions``: ``[B, I]``.

    ``logp_ref`` is ``[S, V]`` log-probs of the unperturbed pass, ``logits`` ``[B, S, V]``;
    ``positions=None`` takes every row. With ``z`` a row's perturbed logits shifted by its largest
    one, ``KL = Σ p·log p − Σ p·z + (Σ p)·log Σ exp z``: exact, a few cached passes over the
    logits and no ``[B, I, V]`` temporaries of log-probabilities. On a 2-core CPU it is about 6×
    faster than ``log_softmax`` + ``F.kl_div`` at 32–64 masks per batch, and on Whisper tiny.en's
    logits about 50× closer to a float64 computation (``benchmarks/perf.py --only kl``; both are within
    2e-6 on small random models).

    >>> ref = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1)
    >>> kl_per_token(ref, torch.tensor([[[0.0, 1.0, 2.0]], [[2.0, 1.0, 0.0]]])).round(decimals=4)
    tensor([[0.0000],
            [1.1504]])
    """
    exact: PartlyExactLogits | None = None
    if isinstance(logits, PartlyExactLogits):
        if positions is not None:
            raise XAttnError("partly exact logits hold the explained positions only: pass positions=None.")
        exact, logits = logits, logits.approx
    elif positions is not None:
        logits, logp_ref = logits[:, positions], logp_ref[positions]
    ref = logp_ref.float()
    p = ref.exp()
    neg_entropy = torch.where(p > 0, p * ref, 0.0).sum(-1)  # p = 0 adds nothing, even where log p = -inf
    mass = p.sum(-1)
    limit = KL_CHUNK_ELEMENTS.get(logits.device.type, KL_CHUNK_ELEMENTS["cuda"])
    rows = max(1, limit // max(1, logits[0].numel()))
    parts = []
    for i, z in enumerate(logits.split(rows)):
        z = z.float()
        if exact is not None:  # the tokens that carry the mass, exact
            values = exact.exact[i * rows : (i + 1) * rows].float()
            z.scatter_(-1, exact.top.unsqueeze(0).expand(z.shape[0], -1, -1), values)
        z = z - z.amax(-1, keepdim=True)
        parts.append(z.exp().sum(-1).log() * mass - (z * p).sum(-1))
    return (torch.cat(parts) + neg_entropy).clamp(min=0.0)


#: Off CUDA, ``encoder_batch_size="auto"`` takes as many masks per batch as fit this many explained
#: token rows (masks × explained tokens), at most :data:`CPU_MAX_MASKS_PER_BATCH`. A batch's logits are
#: ``rows × vocabulary`` floats (about 210 MB for Whisper's 51,864 words), whatever the utterance's
#: length; a fixed 32 masks held 32 × tokens rows (about 3 GB at 448 tokens) and was 3–13 % slower per
#: mask on 6–12-token utterances on a 2-core CPU (``benchmarks/perf.py --only batch``).
CPU_ROWS_PER_BATCH = 1024
CPU_MAX_MASKS_PER_BATCH = 128


def rows_batch_size(rows_per_mask: int, n_masks: int) -> int:
    """Masks per batch off CUDA: :data:`CPU_ROWS_PER_BATCH` rows of explained tokens, between 1 and
    :data:`CPU_MAX_MASKS_PER_BATCH` masks (and at most ``n_masks``).

    >>> rows_batch_size(6, 256), rows_batch_size(12, 256), rows_batch_size(100, 256), rows_batch_size(6, 20)
    (128, 85, 10, 20)
    """
    return max(1, min(n_masks, CPU_MAX_MASKS_PER_BATCH, CPU_ROWS_PER_BATCH // max(1, rows_per_mask)))


def draw_keep_masks(n: int, num_units: int, p: float, generator: torch.Generator, sampling: str = "plain") -> Tensor:
    """``[n, num_units]`` bool, True = kept; each unit occluded with probability ``p``.

    ``sampling`` picks the design (:data:`SAMPLINGS`); all are deterministic given ``generator``.

    >>> g = torch.Generator().manual_seed(0)
    >>> (~draw_keep_masks(10, 4, 0.3, g, "balanced")).sum(0).tolist()
    [3, 3, 3, 3]
    """
    if sampling == "antithetic":
        if abs(p - 0.5) > 1e-9:
            raise XAttnError(
                f"sampling='antithetic' pairs each mask with its complement, which keeps the occlusion rate only "
                f"for p = 0.5 (got {p}); use sampling='plain'."
            )
        half = (n + 1) // 2
        base = torch.rand(half, num_units, generator=generator) >= p
        return torch.cat([base, ~base])[:n]
    if sampling == "balanced":
        occluded = torch.arange(n).unsqueeze(1) < round(p * n)  # [n, 1]: the first round(p·n) rows
        order = torch.rand(n, num_units, generator=generator).argsort(0)  # a permutation per unit
        return ~occluded.expand(n, num_units).gather(0, order)
    if sampling == "sobol":
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        engine = torch.quasirandom.SobolEngine(num_units, scramble=True, seed=seed)
        return engine.draw(n).float() >= p
    if sampling != "plain":
        raise XAttnError(f"Unknown sampling {sampling!r}; choose from {', '.join(SAMPLINGS)}.")
    return torch.rand(n, num_units, generator=generator) >= p


@dataclass
class MaskState:
    """Where a perturbation map's masks stopped, so that a later call with more masks continues it instead of
    starting again: the two half maps' running sums (``num`` ``[2, I, cells]``, ``den`` ``[2, cells]``, float64),
    the masks ``n`` they hold, the seeded generator's state after drawing them, and ``stream``, what the
    masks were drawn for (method, seed, occlusion rate, sampling, units), which a continuation must match.

    With the default ``sampling="plain"`` of ``encoder_spes`` the masks ``n+1 ... N`` of a continuation are
    exactly those of a single call at ``N`` (one uniform stream, drawn in order); other designs continue
    with a fresh block of the same design from the same stream (see ``resume`` of :func:`spes_encoder`).

    Example:
        >>> st = MaskState(torch.zeros(2, 1, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), 0,
        ...                torch.Generator().get_state(), ("encoder_spes", 0))
        >>> st.n, st.num.shape
        (0, torch.Size([2, 1, 3]))
    """

    num: Tensor
    den: Tensor
    n: int
    generator: Tensor
    stream: tuple


class _Accumulator:
    """Running ``Σ_n KL_n·occluded_n`` and ``Σ_n occluded_n`` (paper §6.2 step 7), kept separately
    for even- and odd-numbered masks so that two independent half maps come for free (their
    agreement measures how reliable the map is at this number of masks)."""

    def __init__(self, num_tokens: int, num_cells: int, device: torch.device) -> None:
        self.num = torch.zeros(2, num_tokens, num_cells, device=device, dtype=torch.float64)
        self.den = torch.zeros(2, num_cells, device=device, dtype=torch.float64)
        self.n = 0

    def add(self, kl: Tensor, occluded: Tensor) -> None:
        occ = occluded.to(torch.float64)
        kl = kl.to(torch.float64)
        first = self.n % 2  # global mask index parity, whatever the batch size
        for half in (0, 1):
            sel = slice((half - first) % 2, None, 2)
            self.num[half] += kl[sel].T @ occ[sel]
            self.den[half] += occ[sel].sum(0)
        self.n += kl.shape[0]

    def result(self) -> Tensor:
        return (self.num.sum(0) / self.den.sum(0).clamp(min=1.0)).float()

    def halves(self) -> Tensor:
        """``[2, I, cells]``: the map from the even masks and from the odd masks."""
        return (self.num / self.den.clamp(min=1.0).unsqueeze(1)).float()

    def state(self, generator: torch.Generator, stream: tuple) -> MaskState:
        """The sums so far (on the CPU) and the generator's state, to continue later."""
        return MaskState(self.num.cpu(), self.den.cpu(), self.n, generator.get_state(), stream)


def _start(
    stream: tuple, seed: int, num_tokens: int, num_cells: int, device: torch.device, n_masks: int,
    resume: MaskState | None,
) -> tuple[torch.Generator, _Accumulator]:  # fmt: skip
    """The mask generator and the accumulator of a map: fresh from ``seed``, or where ``resume`` stopped
    (after checking that it was drawn for the same ``stream`` and holds at most ``n_masks`` masks)."""
    gen = torch.Generator().manual_seed(int(seed))
    acc = _Accumulator(num_tokens, num_cells, device)
    if resume is None:
        return gen, acc
    if resume.stream != stream or tuple(resume.num.shape) != tuple(acc.num.shape):
        raise XAttnError(
            f"Cannot continue a map drawn for {resume.stream} (sums {tuple(resume.num.shape)}) as one for {stream} "
            f"(sums {tuple(acc.num.shape)}): the utterance, the explained tokens or the mask options differ."
        )
    if resume.n > n_masks:
        raise XAttnError(f"Cannot continue a map of {resume.n} masks to fewer ({n_masks}).")
    gen.set_state(resume.generator)
    acc.num, acc.den, acc.n = resume.num.to(device).clone(), resume.den.to(device).clone(), resume.n
    return gen, acc


def _mask_loop(
    batches: Iterable[tuple[Tensor, Tensor]],
    score: Callable[[Tensor], Tensor],
    acc: _Accumulator,
    max_seconds: float | None,
    progress: Callable[[int], None] | None,
) -> tuple[float, bool]:
    """The one loop of every perturbation method: for each ``(keep, model_input)`` batch, score the
    perturbed pass (KL per mask and token) and accumulate it over the occluded cells ``~keep``; stop
    after a whole batch once ``max_seconds`` have passed. Returns the seconds and whether the budget
    stopped it."""
    start = time.perf_counter()
    for keep, model_input in batches:
        acc.add(score(model_input), ~keep)
        if progress is not None:
            progress(keep.shape[0])
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            return time.perf_counter() - start, True
    return time.perf_counter() - start, False


def spes_input(
    run: Callable[[Tensor], Tensor],
    features: Tensor,
    num_frames: int,
    logp_ref: Tensor,
    positions: Tensor,
    n_masks: int = DEFAULT_N_MASKS,
    p: float = SpesOptions.p,
    scales: Sequence[int] = SpesOptions.scales,
    batch_size: int = 8,  # the driver resolves SpesOptions.batch_size ("auto" included) to a number
    seed: int = SpesOptions.seed,
    frame_rate: float | None = None,
    compactness: float = SpesOptions.compactness,
    sigma: float = SpesOptions.sigma,
    sampling: str = SpesOptions.sampling,
    max_seconds: float | None = SpesOptions.max_seconds,
    progress: Callable[[int], None] | None = None,
    resume: MaskState | None = None,
) -> SaliencyResult:
    """SPES input saliency ``[I, T, F]`` over the valid ``features[:num_frames]``.

    ``run(x [B, T_full, F]) -> logits [B, S, V]`` is a teacher-forced pass. Padding frames beyond
    ``num_frames`` keep their values and get no saliency. Masks are split equally over ``scales``.
    With ``max_seconds`` the loop stops early (at a whole number of chunks) and the info says how
    many masks were used. ``resume`` (the ``state`` of an earlier result of the same utterance, tokens
    and options) continues that map to ``n_masks``: the masks it lacks, split equally over the scales,
    are drawn from where its stream stopped (a valid SPES design, not the masks of one call at
    ``n_masks``, whose split over the scales differs).
    """
    if n_masks < 1:
        raise XAttnError(f"Expected n_masks >= 1 but got {n_masks}.")
    if not 0.0 < p < 1.0:
        raise XAttnError(f"Expected the occlusion probability p in (0, 1) but got {p}.")
    device = logp_ref.device
    t_valid, n_bins = num_frames, features.shape[-1]
    valid = features[:t_valid]
    counts = segment_counts(t_valid, scales, frame_rate)
    labels = [slic_segments(valid, k, compactness, sigma).reshape(-1).to(device) for k in counts]
    stream = ("spes", int(seed), float(p), sampling, tuple(counts), float(compactness), float(sigma))
    gen, acc = _start(stream, seed, int(positions.numel()), t_valid * n_bins, device, n_masks, resume)
    todo = n_masks - acc.n
    per_scale = [todo // len(labels) + (1 if i < todo % len(labels) else 0) for i in range(len(labels))]
    x_full = features.to(device)

    def batches() -> Iterable[tuple[Tensor, Tensor]]:
        for lab, n_s in zip(labels, per_scale):
            if n_s == 0:
                continue
            keep_seg = draw_keep_masks(n_s, int(lab.max()) + 1, p, gen, sampling).to(device)
            for i0 in range(0, n_s, batch_size):
                keep = keep_seg[i0 : i0 + batch_size][:, lab]  # [b, T*F]
                b = keep.shape[0]
                x = x_full.unsqueeze(0).repeat(b, 1, 1)
                x[:, :t_valid] = x[:, :t_valid] * keep.view(b, t_valid, n_bins).to(x.dtype)
                yield keep, x

    seconds, stopped = _mask_loop(
        batches(), lambda x: kl_per_token(logp_ref, run(x), positions), acc, max_seconds, progress
    )
    return SaliencyResult(
        acc.result().view(-1, t_valid, n_bins).cpu(),
        seconds,
        halves=acc.halves().view(2, -1, t_valid, n_bins).cpu(),
        n_masks=acc.n,
        budget_hit=stopped,
        details={"segments": counts, "batch_size": batch_size},
        state=acc.state(gen, stream),
    )


def spes_encoder(
    run: Callable[[Tensor], Tensor],
    num_encoder_frames: int,
    logp_ref: Tensor,
    positions: Tensor | None,
    n_masks: int = DEFAULT_N_MASKS,
    p_h: float = EncoderSpesOptions.p_h,
    batch_size: int | str = EncoderSpesOptions.encoder_batch_size,
    seed: int = EncoderSpesOptions.seed,
    sampling: str = EncoderSpesOptions.sampling,
    max_seconds: float | None = EncoderSpesOptions.max_seconds,
    progress: Callable[[int], None] | None = None,
    smoothing: int = EncoderSpesOptions.smoothing,
    resume: MaskState | None = None,
) -> SaliencyResult:
    """Encoder-output saliency ``[I, T']`` (paper §1.4): zero whole valid encoder frames with
    probability ``p_h``; ``run(keep [B, T'_valid]) -> logits [B, S, V]`` re-runs only the decoder
    with the frames where ``keep`` is False occluded (``Adapter.masked_decoder``); ``positions``
    are the explained rows of ``logp_ref`` and the logits (``None``: every row, when ``run``
    returns only the explained positions). ``batch_size="auto"``: :func:`rows_batch_size` masks per
    batch. ``smoothing`` filters the map and its two halves in time (:func:`smooth_frames`; 0: the
    paper's estimator). ``resume`` (the ``state`` of an earlier result of the same utterance, tokens and
    options) continues that map to ``n_masks``, drawing only the masks it lacks from where its stream
    stopped: with ``sampling="plain"`` (the default), the same masks as one call at ``n_masks``, so the
    same map up to float rounding; the other designs add a block of their design."""
    check_smoothing(smoothing)  # a bad width fails before any mask runs
    if n_masks < 1:
        raise XAttnError(f"Expected n_masks >= 1 but got {n_masks}.")
    if not 0.0 < p_h < 1.0:
        raise XAttnError(f"Expected the encoder occlusion probability p_h in (0, 1) but got {p_h}.")
    device = logp_ref.device
    t_valid = num_encoder_frames
    rows = logp_ref.shape[0] if positions is None else int(positions.numel())
    per_batch = rows_batch_size(rows, n_masks) if batch_size == "auto" else int(batch_size)
    stream = ("encoder_spes", int(seed), float(p_h), sampling, t_valid)
    gen, acc = _start(stream, int(seed) + 7919, rows, t_valid, device, n_masks, resume)
    todo = n_masks - acc.n
    keep_all = draw_keep_masks(todo, t_valid, p_h, gen, sampling).to(device) if todo else None
    batches = ((keep, keep) for keep in (keep_all.split(per_batch) if keep_all is not None else ()))
    seconds, stopped = _mask_loop(
        batches, lambda keep: kl_per_token(logp_ref, run(keep), positions), acc, max_seconds, progress
    )
    return SaliencyResult(
        smooth_frames(acc.result(), smoothing).cpu(),
        seconds,
        halves=smooth_frames(acc.halves(), smoothing).cpu(),
        n_masks=acc.n,
        budget_hit=stopped,
        details={"batch_size": per_batch, "smoothing": smoothing},
        state=acc.state(gen, stream),
    )
