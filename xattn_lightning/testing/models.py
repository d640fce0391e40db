"""A small Transformer S2T model in plain PyTorch (the demo's and the tests' custom model)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TinyS2T(nn.Module):
    """Conv subsampler (two stride-2 convolutions: 4 input frames per encoder frame), a
    Transformer encoder and an ``nn.TransformerDecoder``.

    ``forward(features [B, T, F], decoder_ids [B, S]) -> logits [B, S, V]``.

    >>> m = TinyS2T(vocab_size=10, num_mel_bins=8)
    >>> m(torch.randn(2, 16, 8), torch.ones(2, 3, dtype=torch.long)).shape
    torch.Size([2, 3, 10])
    """

    def __init__(
        self,
        vocab_size: int = 32,
        num_mel_bins: int = 8,
        d_model: int = 32,
        nhead: int = 2,
        num_encoder_layers: int = 1,
        num_decoder_layers: int = 2,
        dim_feedforward: int = 64,
        dropout: float = 0.0,
        max_len: int = 512,
    ) -> None:
        super().__init__()
        self.num_mel_bins = num_mel_bins
        self.subsample = nn.Sequential(
            nn.Conv1d(num_mel_bins, d_model, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv1d(d_model, d_model, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        enc_layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(enc_layer, num_encoder_layers, enable_nested_tensor=False)
        self.embed = nn.Embedding(vocab_size, d_model)
        dec_layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(dec_layer, num_decoder_layers)
        self.out = nn.Linear(d_model, vocab_size)
        self.max_len = max_len

    def forward(self, features: Tensor, decoder_ids: Tensor) -> Tensor:
        """Teacher-forced logits."""
        return self.decoder_forward(self.encoder_forward(features), decoder_ids)

    def decoder_forward(self, memory: Tensor, decoder_ids: Tensor) -> Tensor:
        """Teacher-forced logits over a given encoder output ``memory`` ``[B, T', D]``."""
        s = decoder_ids.shape[1]
        y = self.embed(decoder_ids) * math.sqrt(self.embed.embedding_dim) + self.pos[:s]
        causal = nn.Transformer.generate_square_subsequent_mask(s, device=y.device, dtype=y.dtype)
        h = self.decoder(y, memory, tgt_mask=causal, tgt_is_causal=True)
        return self.out(h)

    def encoder_forward(self, features: Tensor) -> Tensor:
        """Runs ``self.encoder`` through its module call so hooks see H."""
        x = self.subsample(features.transpose(1, 2)).transpose(1, 2)
        x = x + self.pos[: x.shape[1]]
        return self.encoder(x)

    @staticmethod
    def adapter(model: TinyS2T, tokenizer: object | None = None, decoder_start_id: int = 1, eos_id: int = 2):
        """The :class:`~xattn_lightning.HookAdapter` for this model (start token 1, EOS 2, pad 0).

        >>> TinyS2T.adapter(TinyS2T()).info.num_heads
        2
        """
        from xattn_lightning.adapters import HookAdapter

        return HookAdapter(
            model,
            encoder="encoder",
            cross_attention="decoder.layers.*.multihead_attn",
            decoder_start_id=decoder_start_id,
            eos_id=eos_id,
            special_ids=(0,),
            frames_per_step=4,
            num_mel_bins=model.num_mel_bins,
            max_target_positions=model.max_len,
            tokenizer=tokenizer,
        )
