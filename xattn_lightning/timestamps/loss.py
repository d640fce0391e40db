"""An alignment loss for fine-tuning: the chosen heads' cross-attention trained towards true word timings.

Add it to a fine-tune's loss where the batch carries word timings (``words``: per utterance a list of
``(unit, start_s, end_s)``, as :func:`~xattn_lightning.loading.features_batch` reads from a manifest's
``words`` column). Each text token's row of each chosen head is pulled towards its word's span (the
KL of :func:`~xattn_lightning.functional.alignment.alignment_kl`), in openai-whisper's convention: the
row that predicts a token times it, and the row that predicts the end of text ends the last word. Export the heads afterwards (:meth:`AlignmentLoss.export`) so that
``generate(return_token_timestamps=True)``, openai-whisper's ``word_timestamps`` and
:func:`xattn_lightning.word_timestamps` (``heads="model"``) use them. Stands without Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from xattn_lightning.adapters import Adapter, adapter_for
from xattn_lightning.errors import XAttnError
from xattn_lightning.functional.alignment import Word, alignment_kl, span_target, token_spans

#: the row that predicts the end of text is pulled towards this many seconds after the last word's end
EOS_SECONDS = 0.1


class AlignmentLoss:
    """``KL(true word span || attention)`` of the chosen heads, averaged over heads and text tokens.

    Args:
        model: the model being fine-tuned (or its adapter); it must return cross-attention weights with
            gradients (a Hugging Face Whisper loaded with ``attn_implementation="eager"``, called with
            ``output_attentions=True``).
        heads: ``[layer, head]`` pairs to train (e.g. from :func:`xattn_lightning.alignment_heads`).
        tokenizer: the model's tokenizer or processor (token strings group tokens into words).
        ramp_frames: the target falls to zero over this many encoder frames outside a word's span.

    Example (in a LightningModule's ``training_step``)::

        align = xl.AlignmentLoss(model, heads=[[2, 1], [3, 0]], tokenizer=processor)
        out = model(input_features=batch["input_features"], labels=batch["labels"], output_attentions=True)
        loss = out.loss + 0.5 * align(out.cross_attentions, batch["labels"], batch["words"])
        ...
        align.export()  # after fit: the model's own word timestamps use the trained heads
    """

    def __init__(
        self,
        model: nn.Module | Adapter,
        heads: Sequence[Sequence[int]],
        tokenizer: object | None = None,
        ramp_frames: int = 2,
    ) -> None:
        self.adapter = adapter_for(model, tokenizer)
        info = self.adapter.info
        self.heads = [[int(layer), int(head)] for layer, head in heads]
        if not self.heads:
            raise XAttnError("AlignmentLoss needs at least one [layer, head] pair to train.")
        bad = [h for h in self.heads if not (0 <= h[0] < info.num_layers and 0 <= h[1] < info.num_heads)]
        if bad:
            raise XAttnError(
                f"Heads {bad} are outside the model's {info.num_layers} layers x {info.num_heads} heads."
            )
        if self.adapter.token_strings(torch.tensor([0])) is None:
            raise XAttnError("AlignmentLoss needs the tokenizer (tokenizer=processor) to group tokens into words.")
        if ramp_frames < 0:
            raise XAttnError(f"Expected ramp_frames >= 0 but got {ramp_frames}.")
        self.ramp_frames = ramp_frames
        self.frame_seconds = self.adapter.frames_per_step() / self.adapter.frame_rate

    def __call__(
        self, cross_attentions: Tensor | Sequence[Tensor], labels: Tensor, words: Sequence[Sequence[Word] | None]
    ) -> Tensor:
        """The loss of one batch: ``cross_attentions`` per layer ``[B, H, S, T']`` (a model output's
        ``cross_attentions``) or stacked ``[B, L, H, S, T']``; ``labels [B, S]`` the targets whose
        prediction row ``s`` is attention row ``s`` (``-100`` padding); ``words`` each utterance's true
        timings (``None`` for one without: it adds nothing). Zero, with a gradient, when no utterance has
        timings."""
        ca = self._chosen(cross_attentions)  # [B, K, S, T'], the chosen heads only
        if labels.shape[0] != ca.shape[0] or len(words) != ca.shape[0]:
            raise XAttnError(
                f"{ca.shape[0]} utterances of cross-attention, {labels.shape[0]} of labels and {len(words)} of words."
            )
        losses = []
        for b, units in enumerate(words):
            if units is None:
                continue
            lab = labels[b].detach().cpu()
            text = (lab != -100) & ~self.adapter.special_mask(lab.clamp(min=0))
            rows = text.nonzero().view(-1)
            if rows.numel() == 0 or not units:
                continue
            pieces = self.adapter.token_strings(lab[rows])
            assert pieces is not None  # checked at construction
            spans = token_spans(pieces, [(str(u[0]), float(u[1]), float(u[2])) for u in units])
            last = int(rows[-1]) + 1
            if last < len(lab) and int(lab[last]) == self.adapter.info.eos_id:
                # the row predicting the end of text ends the last word (openai-whisper's convention)
                end = max(float(u[2]) for u in units)
                rows = torch.cat([rows, torch.tensor([last])])
                spans.append((end, end + EOS_SECONDS))
            target = span_target(spans, ca.shape[-1], self.frame_seconds, self.ramp_frames).to(ca.device)
            losses.append(alignment_kl(ca[b][:, rows.to(ca.device)].float(), target))  # [K, I, T'] rows
        if not losses:
            return ca.sum() * 0.0
        return torch.stack(losses).mean()

    def _chosen(self, cross_attentions: Tensor | Sequence[Tensor]) -> Tensor:
        """The chosen heads' maps ``[B, K, S, T']``, taken without stacking the other layers."""
        if isinstance(cross_attentions, Tensor):
            if cross_attentions.dim() != 5:
                raise XAttnError(
                    f"Expected cross-attention [B, L, H, S, T'] (or per layer [B, H, S, T']), "
                    f"got {tuple(cross_attentions.shape)}."
                )
            layers, heads = zip(*self.heads)
            return cross_attentions[:, list(layers), list(heads)]
        if not cross_attentions or any(c is None for c in cross_attentions):
            raise XAttnError(
                "No cross-attention weights: load the model with attn_implementation='eager' and call it with "
                "output_attentions=True (SDPA and flash attention return none)."
            )
        return torch.stack([cross_attentions[layer][:, head] for layer, head in self.heads], dim=1)

    def export(self) -> str:
        """Write the trained heads into the model, for its own word timestamps; returns where."""
        return self.adapter.set_alignment_heads(self.heads)

    def __repr__(self) -> str:
        return f"AlignmentLoss(heads={self.heads}, ramp_frames={self.ramp_frames})"

