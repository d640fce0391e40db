"""The vocabulary term of a masked pass in bfloat16, with the tokens that carry the mass exact
(``vocabulary="bf16"``, an option of ``encoder_spes``, and what ``vocabulary="auto"``, the default, takes on a
CPU with AMX units; issue 34, fidelity in ``docs/costs.md``).

A mask's decoder pass spends about half its time projecting the explained positions onto the
vocabulary (51,864 words for Whisper), which the KL normalises over. With ``vocabulary="bf16"`` the
projection runs in bfloat16 (on CPUs with AMX or AVX-512 BF16 units, and on GPUs, several times a float32
matrix product), and the :data:`VOCABULARY_TOP` most probable tokens of the unmasked distribution at each
position are recomputed in float32. The KL's formula is unchanged; where every other logit is within
``δ`` of its float32 value (bfloat16 rounding), the KL moves by at most ``δ`` times the mass those tokens
hold under either distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from xattn_lightning.errors import XAttnError
from xattn_lightning.saliency.perturbation import PartlyExactLogits

#: tokens per explained position whose logits stay exact (float32): the unmasked distribution's most probable
VOCABULARY_TOP = 16


def bf16_logits(
    hidden: Tensor, weight: Tensor, weight_bf16: Tensor, top: Tensor, bias: Tensor | None = None
) -> PartlyExactLogits:
    """Logits of ``hidden`` ``[B, P, d]`` through a linear head ``weight`` ``[V, d]``: all in bfloat16
    (``weight_bf16``), and the ``top`` ``[P, k]`` tokens of each position exact (float32), as
    :class:`~xattn_lightning.saliency.perturbation.PartlyExactLogits` for :func:`kl_per_token`.

    >>> w = torch.randn(50, 8); h = torch.randn(3, 2, 8); top = torch.tensor([[0, 1], [2, 3]])
    >>> z = bf16_logits(h, w, w.bfloat16(), top)
    >>> exact = h @ w.T
    >>> torch.allclose(z.exact[:, 0], exact[:, 0, :2], atol=1e-5), bool((z.approx.float() - exact).abs().max() < 0.1)
    (True, True)
    >>> from xattn_lightning.saliency.perturbation import kl_per_token
    >>> ref = exact[0].log_softmax(-1)
    >>> bool((kl_per_token(ref, z) - kl_per_token(ref, exact)).abs().max() < 0.05)
    True
    """
    approx = torch.matmul(hidden.to(torch.bfloat16), weight_bf16.T)
    exact = torch.einsum("bpd,pkd->bpk", hidden.float(), weight[top].float())
    if bias is not None:
        approx = approx + bias.to(approx.dtype)
        exact = exact + bias.float()[top]
    return PartlyExactLogits(approx, top, exact)


def has_bf16_units(device: torch.device | str) -> bool:
    """Whether ``vocabulary="auto"`` takes the bfloat16 vocabulary term on ``device``: a CPU with AMX tile units
    (where it was measured: 1.3–2.2× faster masks, ``docs/costs.md``). CUDA and CPUs without AMX keep the
    float32 term: there a bfloat16 product was not measured to pay (emulated on CPUs without bfloat16 units).

    >>> has_bf16_units("meta")
    False
    """
    if torch.device(device).type != "cpu":
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx()) if callable(amx) else False


def resolve_vocabulary(vocabulary: str, adapter: Any, autocast: str | None = None) -> str:
    """The vocabulary term a masked pass takes: ``"exact"`` or ``"bf16"`` as asked; ``"auto"``: ``"bf16"`` where
    :func:`has_bf16_units` on the adapter's device, the model has a linear output head and the pass is not
    under ``autocast``, else ``"exact"``.

    >>> resolve_vocabulary("exact", None)
    'exact'
    """
    if vocabulary != "auto":
        return vocabulary
    if autocast is not None or not has_bf16_units(getattr(adapter, "device", "cpu")):
        return "exact"
    return "bf16" if _head_of(adapter) is not None else "exact"


def _head_of(adapter: Any) -> nn.Linear | None:
    head = adapter.output_head() if callable(getattr(adapter, "output_head", None)) else None
    return head if isinstance(head, nn.Linear) else None


def output_head(adapter: Any) -> nn.Linear:
    """The linear output head of ``adapter``'s masked passes (:meth:`~xattn_lightning.Adapter.output_head`: Hugging
    Face models, openai-whisper), or an error that says why not."""
    head = _head_of(adapter)
    if head is None:
        raise XAttnError(
            f"vocabulary='bf16' needs a model with a linear output head (Adapter.output_head()); "
            f"{type(adapter).__name__} has none. Use vocabulary='exact'."
        )
    return head


def with_bf16_vocabulary(
    adapter: Any, run: Callable[[Tensor], Tensor], logp_ref: Tensor
) -> Callable[[Tensor], PartlyExactLogits]:
    """``run`` (a masked pass that projects the explained positions, ``logp_ref`` ``[P, V]`` their unmasked
    log-probabilities) with its output head in bfloat16 and each position's :data:`VOCABULARY_TOP` tokens
    exact (:func:`bf16_logits`). The head is swapped only while ``run`` runs; the model sees the bfloat16
    logits, the KL gets them with the exact values beside."""
    head = output_head(adapter)
    top = logp_ref.topk(min(VOCABULARY_TOP, logp_ref.shape[-1]), dim=-1).indices.to(head.weight.device)
    weight = head.weight.detach()
    weight_bf16 = weight.to(torch.bfloat16)
    bias = head.bias.detach() if head.bias is not None else None

    made: list[PartlyExactLogits] = []

    def forward(hidden: Tensor) -> Tensor:
        if hidden.shape[-2] != top.shape[0]:
            raise XAttnError(
                f"vocabulary='bf16' expected the {top.shape[0]} explained positions at the output head, got "
                f"{hidden.shape[-2]}."
            )
        made.append(bf16_logits(hidden, weight, weight_bf16, top, bias))
        return made[-1].approx

    def bf16_run(keep: Tensor) -> PartlyExactLogits:
        made.clear()
        head.forward = forward  # type: ignore[method-assign, assignment]
        try:
            approx = run(keep)
        finally:
            del head.forward
        if len(made) != 1 or approx.data_ptr() != made[0].approx.data_ptr():
            raise XAttnError("vocabulary='bf16': the model changed the output head's logits; use vocabulary='exact'.")
        return made[0]

    return bf16_run
