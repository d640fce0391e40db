"""Decoder-side helpers the adapters share: the attention bias that turns frame occlusion into masking
(:func:`occlusion_bias`), and greedy or beam search over a cached encoder output (:func:`generic_generate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from xattn_lightning.adapters.base import Adapter


def occlusion_bias(keep: Tensor, num_frames: int) -> Tensor:
    """Additive attention bias ``[B, 1, 1, T' + 1]`` that makes attention over the encoder frames
    plus one appended "occluded frame" equal attention over the frames with the occluded ones
    (``keep`` False, ``[B, t]``, the first ``t`` frames) replaced by that frame: occluded frames get
    ``-inf``, the appended one ``log(number occluded)`` (``-inf`` when none is).

    >>> occlusion_bias(torch.tensor([[True, False, False]]), 4).flatten().tolist()[:3]
    [0.0, -inf, -inf]
    """
    b, t = keep.shape
    bias = keep.new_zeros(b, num_frames + 1, dtype=torch.float32)
    bias[:, :t] = torch.where(keep, 0.0, -torch.inf)
    occluded = (~keep).sum(1).float()
    bias[:, -1] = torch.where(occluded > 0, occluded.clamp(min=1).log(), -torch.inf)
    return bias[:, None, None, :]


@torch.no_grad()
def generic_generate(
    adapter: Adapter, encoder_out: Tensor, num_beams: int = 1, max_new_tokens: int | None = None
) -> Tensor:
    """Greedy (``num_beams=1``) or beam search over an encoder output ``[1, T', D]`` with the adapter's
    :meth:`~xattn_lightning.adapters.Adapter.decode`, for adapters without a generation routine of their
    own. Returns the sequence including the prompt."""
    info = adapter.info
    limit = info.max_target_positions or 128
    max_new = min(max_new_tokens or min(limit, 200), limit - len(adapter.prompt_ids()))
    enc = encoder_out
    prompt = torch.tensor(adapter.prompt_ids(), device=adapter.device)
    beams: list[tuple[float, Tensor]] = [(0.0, prompt)]
    finished: list[tuple[float, Tensor]] = []
    for step in range(max(max_new, 0)):
        seqs = torch.stack([b[1] for b in beams])
        out = adapter.decode(enc.expand(len(beams), -1, -1), seqs)
        logp = adapter.suppress(out.logits[:, -1].float().log_softmax(-1), step)
        cand: list[tuple[float, Tensor]] = []
        for (score, seq), lp in zip(beams, logp):
            top = lp.topk(num_beams)
            for v, i in zip(top.values, top.indices):
                cand.append((score + float(v), torch.cat([seq, i.view(1)])))
        cand.sort(key=lambda c: c[0], reverse=True)
        beams = []
        for score, seq in cand:
            if int(seq[-1]) == info.eos_id:
                finished.append((score / (seq.numel() - len(prompt)), seq))
            else:
                beams.append((score, seq))
            if len(beams) == num_beams:
                break
        if len(finished) >= num_beams or not beams:
            break
    if not finished:
        finished = [(s / max(1, q.numel() - len(prompt)), q) for s, q in beams]
    best = max(finished, key=lambda c: c[0])[1]
    return best.cpu()
