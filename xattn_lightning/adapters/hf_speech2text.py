"""The adapter for Hugging Face ``Speech2TextForConditionalGeneration`` (:class:`Speech2TextAdapter`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from xattn_lightning.adapters.hf import _HFSeq2SeqAdapter, _tokenizer_special_ids
from xattn_lightning.adapters.records import AdapterInfo, Utterance
from xattn_lightning.errors import XAttnError


class Speech2TextAdapter(_HFSeq2SeqAdapter):
    """Adapter for ``transformers.Speech2TextForConditionalGeneration`` (features ``[B, T, F]``).

    Example:
        >>> from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration
        >>> cfg = Speech2TextConfig(vocab_size=30, d_model=8, encoder_layers=1, decoder_layers=1,
        ...     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
        ...     conv_channels=8, input_feat_per_channel=20)
        >>> a = Speech2TextAdapter(Speech2TextForConditionalGeneration(cfg))
        >>> a.frames_per_step(), a.encoder_length(103)
        (4, 26)
    """

    def _find_convs(self) -> list[nn.Conv1d]:
        return list(self.model.get_encoder().conv.conv_layers)

    def _read_info(self) -> AdapterInfo:
        cfg = self.model.config
        gen = getattr(self.model, "generation_config", None)
        start = int(getattr(gen, "decoder_start_token_id", None) or cfg.decoder_start_token_id)
        eos = int(getattr(gen, "eos_token_id", None) or cfg.eos_token_id)
        special = {start, eos, int(cfg.pad_token_id), int(cfg.bos_token_id)} | _tokenizer_special_ids(self.tokenizer)
        forced = getattr(gen, "forced_bos_token_id", None)
        if forced is not None:
            special.add(int(forced))
        return AdapterInfo(
            num_layers=int(cfg.decoder_layers),
            num_heads=int(cfg.decoder_attention_heads),
            num_mel_bins=int(cfg.input_feat_per_channel) * int(cfg.input_channels),
            decoder_start_id=start,
            eos_id=eos,
            special_ids=frozenset(special),
            max_target_positions=int(cfg.max_target_positions),
            vocab_size=int(cfg.vocab_size),
        )

    def prompt_ids(self) -> list[int]:
        forced = getattr(self.model.generation_config, "forced_bos_token_id", None)
        return [self.info.decoder_start_id] + ([int(forced)] if forced is not None else [])

    def _to_model(self, features: Tensor) -> Tensor:
        return features

    def utterances(self, batch: Mapping[str, Tensor]) -> list[Utterance]:
        x = self._check_batch(batch)
        if x.shape[2] != self.info.num_mel_bins:
            raise XAttnError(
                f"Expected {self.input_key!r} of shape (batch, frames, {self.info.num_mel_bins}) but got "
                f"{tuple(x.shape)}; use the model's own Speech2TextFeatureExtractor."
            )
        mask = batch.get("attention_mask")
        out = []
        for b in range(x.shape[0]):
            n = int(torch.as_tensor(mask)[b].sum()) if mask is not None else x.shape[1]
            if self.encoder_length(n) < 1 or n < 1:
                raise XAttnError(f"Utterance {b} has {n} frames, too short for the encoder; drop it.")
            # no fixed window: keep only the valid frames, so no padding is ever perturbed
            out.append(Utterance(features=x[b, :n].contiguous(), num_frames=n, index=b))
        return out
