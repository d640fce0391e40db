"""The adapter for Hugging Face ``WhisperForConditionalGeneration`` (:class:`WhisperAdapter`), and the
utterances of a Whisper batch padded to its 30-s window (:func:`whisper_window_utterances`, which the
openai-whisper adapter shares).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from xattn_lightning.adapters.hf import _HFSeq2SeqAdapter, _tokenizer_special_ids
from xattn_lightning.adapters.records import AdapterInfo, Utterance, check_features
from xattn_lightning.errors import XAttnError


class WhisperAdapter(_HFSeq2SeqAdapter):
    """Adapter for ``transformers.WhisperForConditionalGeneration`` (English-only or multilingual).

    Whisper pads every input to a 30-s window; the valid length comes from the batch's
    ``attention_mask`` (``processor(..., return_attention_mask=True)``) or, without one, from the
    constant padding frames at the end. Results are cut to the valid encoder frames.

    Example:
        >>> from transformers import WhisperConfig, WhisperForConditionalGeneration
        >>> cfg = WhisperConfig(vocab_size=60, d_model=8, encoder_layers=1, decoder_layers=2,
        ...     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
        ...     decoder_start_token_id=50, eos_token_id=51, pad_token_id=51, max_source_positions=1500)
        >>> a = WhisperAdapter(WhisperForConditionalGeneration(cfg))
        >>> a.frames_per_step(), a.encoder_length(3000), a.info.num_layers
        (2, 1500, 2)
    """

    def _find_convs(self) -> list[nn.Conv1d]:
        enc = self.model.get_encoder()
        return [enc.conv1, enc.conv2]

    def _read_info(self) -> AdapterInfo:
        cfg = self.model.config
        gen = getattr(self.model, "generation_config", None)
        start = int(getattr(gen, "decoder_start_token_id", None) or cfg.decoder_start_token_id)
        eos = int(getattr(gen, "eos_token_id", None) or cfg.eos_token_id)
        vocab = int(cfg.vocab_size)
        # Whisper puts every special token (EOT, SOT, languages, tasks, timestamps) after the text vocabulary
        first_special = min(start, eos)
        special = set(range(first_special, max(vocab, first_special + 1))) | _tokenizer_special_ids(self.tokenizer)
        return AdapterInfo(
            num_layers=int(cfg.decoder_layers),
            num_heads=int(cfg.decoder_attention_heads),
            num_mel_bins=int(cfg.num_mel_bins),
            decoder_start_id=start,
            eos_id=eos,
            special_ids=frozenset(special),
            max_target_positions=int(cfg.max_target_positions),
            fixed_num_frames=int(cfg.max_source_positions) * self.frames_per_step(),
            vocab_size=vocab,
        )

    def prompt_ids(self) -> list[int]:
        gen = self.model.generation_config
        prompt = [self.info.decoder_start_id]
        if getattr(gen, "is_multilingual", False):
            lang = getattr(gen, "language", None) or "<|en|>"
            if not lang.startswith("<|"):
                lang = f"<|{lang}|>"
            lang_ids = getattr(gen, "lang_to_id", {}) or {}
            task_ids = getattr(gen, "task_to_id", {}) or {}
            if lang in lang_ids:
                prompt.append(int(lang_ids[lang]))
            task = getattr(gen, "task", None) or "transcribe"
            if task in task_ids:
                prompt.append(int(task_ids[task]))
        no_ts = getattr(gen, "no_timestamps_token_id", None)
        if no_ts is not None:
            prompt.append(int(no_ts))
        return prompt

    def _to_model(self, features: Tensor) -> Tensor:
        return features.transpose(1, 2)

    def utterances(self, batch: Mapping[str, Tensor]) -> list[Utterance]:
        return whisper_window_utterances(
            self._check_batch(batch), batch.get("attention_mask"), self.info, self.input_key
        )


def whisper_window_utterances(x: Tensor, mask: Tensor | None, info: AdapterInfo, key: str) -> list[Utterance]:
    """Utterances of a Whisper batch ``x [B, n_mels, window]``: the valid length of each from the
    attention ``mask`` or, without one, from the constant padding frames at the end."""
    if x.dim() != 3:
        raise XAttnError(
            f"Expected {key!r} of rank 3 (batch, mel bins, frames) but got shape {tuple(x.shape)}; "
            "add a batch dimension with .unsqueeze(0) for a single utterance."
        )
    check_features(x, repr(key))
    if x.shape[1] != info.num_mel_bins:
        raise XAttnError(
            f"Expected {key!r} of shape (batch, {info.num_mel_bins} mel bins, frames) but got "
            f"{tuple(x.shape)}; use the model's own feature extractor (log-mel spectrogram)."
        )
    if x.shape[2] != info.fixed_num_frames:
        raise XAttnError(
            f"Whisper expects {info.fixed_num_frames} frames (its 30-s window) but the features have "
            f"{x.shape[2]}; pad them to the window (WhisperProcessor(padding='max_length') or whisper.pad_or_trim)."
        )
    out = []
    for b in range(x.shape[0]):
        feats = x[b].transpose(0, 1).contiguous()  # [T, F]
        n = int(torch.as_tensor(mask)[b].sum()) if mask is not None else _valid_frames_from_padding(feats)
        if n < 1:
            raise XAttnError(f"Utterance {b} has no valid frames (empty audio); drop it from the batch.")
        out.append(Utterance(features=feats, num_frames=n, index=b))
    return out


def _valid_frames_from_padding(feats: Tensor) -> int:
    """Valid frames of a Whisper window without an attention mask: trailing frames equal to the
    (constant) last frame are padding."""
    last = feats[-1]
    if not torch.all(last == last[0]):
        return feats.shape[0]
    same = (feats == last).all(dim=1)
    n = feats.shape[0]
    while n > 0 and bool(same[n - 1]):
        n -= 1
    return max(n, 1)
