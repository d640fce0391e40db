"""Adapter for models of the ``openai-whisper`` package (``whisper.load_model(...)``, ``whisper.model.Whisper``).

The package is an optional extra (``pip install "xattn_lightning[openai-whisper]"``); nothing here
imports it before a model of it is seen.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from xattn_lightning.adapters.base import Adapter, MaskedDecoder, at_positions, uncompiled, upto_positions
from xattn_lightning.adapters.decoding import occlusion_bias
from xattn_lightning.adapters.hf import conv_output_length
from xattn_lightning.adapters.hf_whisper import whisper_window_utterances
from xattn_lightning.adapters.records import AdapterInfo, ForwardOutput, Utterance
from xattn_lightning.errors import XAttnError


def is_openai_whisper(model: object) -> bool:
    """True for a ``whisper.model.Whisper`` (checked without importing the package).

    >>> is_openai_whisper(nn.Linear(1, 1))
    False
    """
    return (
        isinstance(model, nn.Module)
        and type(model).__module__.split(".")[0] == "whisper"
        and hasattr(model, "dims")
        and hasattr(model, "encoder")
        and hasattr(model, "decoder")
    )


def default_tokenizer(model: nn.Module, language: str | None = None, task: str = "transcribe") -> object:
    """openai-whisper's own tokenizer for ``model`` (English-only or multilingual; no download)."""
    from whisper.tokenizer import get_tokenizer

    multilingual = bool(model.is_multilingual)
    return get_tokenizer(
        multilingual,
        num_languages=int(getattr(model, "num_languages", 99)),
        language=(language or "en") if multilingual else None,
        task=task if multilingual else None,
    )


@contextlib.contextmanager
def _eager_attention() -> Iterator[None]:
    """The package's attention without SDPA (the only path that returns the weights), restored after."""
    from whisper.model import MultiHeadAttention

    prev = getattr(MultiHeadAttention, "use_sdpa", None)
    try:
        if prev is not None:
            MultiHeadAttention.use_sdpa = False
        yield
    finally:
        if prev is not None:
            MultiHeadAttention.use_sdpa = prev


class OpenAIWhisperAdapter(Adapter):
    """Adapter for ``whisper.model.Whisper`` of the ``openai-whisper`` package.

    Batches carry the log-mel spectrogram as ``whisper.log_mel_spectrogram`` + ``pad_or_trim`` give
    it, ``input_features [B, n_mels, 3000]`` (30-s window; the valid length comes from an
    ``attention_mask`` or from the constant padding frames). Cross-attention is read from every
    decoder block's ``cross_attn`` (softmax of its ``qk``) with the package's SDPA switched off for
    the call and restored afterwards; perturbed passes run with the model's own attention.

    Args:
        model: the ``whisper.model.Whisper``.
        tokenizer: a ``whisper.tokenizer.Tokenizer``; default: the package's own for the model.
        language, task: for multilingual models, the prompt (default English transcription).

    Example:
        >>> import whisper.model as wm
        >>> dims = wm.ModelDimensions(n_mels=80, n_audio_ctx=50, n_audio_state=16, n_audio_head=2,
        ...     n_audio_layer=1, n_vocab=51864, n_text_ctx=32, n_text_state=16, n_text_head=2, n_text_layer=2)
        >>> a = OpenAIWhisperAdapter(wm.Whisper(dims))
        >>> a.info.num_layers, a.encoder_length(100), a.prompt_ids()
        (2, 50, [50257, 50362])
    """

    split_passes = True

    def alignment_heads(self) -> list[list[int]] | None:
        """The heads of the model's ``alignment_heads`` buffer (``transcribe(word_timestamps=True)`` uses them;
        the package's fallback is every head of the upper half of the layers)."""
        buf = getattr(self.model, "alignment_heads", None)
        if buf is None:
            return None
        dense = buf.to_dense() if buf.is_sparse else buf
        return [[int(layer), int(head)] for layer, head in dense.nonzero().tolist()]

    def set_alignment_heads(self, heads: Sequence[Sequence[int]]) -> str:
        """Replaces the model's ``alignment_heads`` buffer, as ``whisper.model.Whisper.set_alignment_heads``
        does from its encoded form."""
        set_alignment_heads(self.model, heads)
        return "the model's alignment_heads buffer"

    def __init__(
        self, model: nn.Module, tokenizer: object | None = None, language: str | None = None, task: str = "transcribe"
    ) -> None:
        whisper_model: Any = uncompiled(model)  # a whisper.model.Whisper: attributes torch does not type
        if not is_openai_whisper(whisper_model):
            raise XAttnError(f"Expected a whisper.model.Whisper but got {type(whisper_model).__name__}.")
        tokenizer = tokenizer if tokenizer is not None else default_tokenizer(whisper_model, language, task)
        super().__init__(whisper_model, tokenizer)
        tok = self.tokenizer
        dims = whisper_model.dims
        for name in ("eot", "sot", "sot_sequence_including_notimestamps"):
            if not hasattr(tok, name):
                raise XAttnError(
                    f"The tokenizer {type(tok).__name__} has no {name!r}; pass openai-whisper's own "
                    "(whisper.tokenizer.get_tokenizer(...)) or leave tokenizer= out."
                )
        self._convs = [whisper_model.encoder.conv1, whisper_model.encoder.conv2]
        eot = int(tok.eot)
        self._prompt = [int(i) for i in tok.sot_sequence_including_notimestamps]
        self._space = [int(i) for i in tok.encode(" ")] if hasattr(tok, "encode") else []
        self._info = AdapterInfo(
            num_layers=int(dims.n_text_layer),
            num_heads=int(dims.n_text_head),
            num_mel_bins=int(dims.n_mels),
            decoder_start_id=int(tok.sot),
            eos_id=eot,
            # every special token (EOT, SOT, languages, tasks, timestamps) follows the text vocabulary
            special_ids=frozenset(range(eot, int(dims.n_vocab))),
            max_target_positions=int(dims.n_text_ctx),
            fixed_num_frames=int(dims.n_audio_ctx) * self.frames_per_step(),
            vocab_size=int(dims.n_vocab),
        )

    @property
    def info(self) -> AdapterInfo:
        return self._info

    def frames_per_step(self, utterance: Utterance | None = None) -> int:
        return int(self._convs[0].stride[0] * self._convs[1].stride[0])

    def encoder_length(self, num_frames: int) -> int:
        return conv_output_length(num_frames, self._convs)

    def prompt_ids(self) -> list[int]:
        return list(self._prompt)

    def normalize_target(self, ids: Tensor | Sequence[int]) -> Tensor:
        return self.with_prompt(super().normalize_target(ids))

    # ------------------------------------------------------------------ batch I/O
    def utterances(self, batch: Mapping[str, Tensor]) -> list[Utterance]:
        if not isinstance(batch, Mapping) or self.input_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise XAttnError(
                f"The batch has no {self.input_key!r} (got {keys}); pass the log-mel spectrogram "
                "[B, n_mels, 3000] of whisper.log_mel_spectrogram(whisper.pad_or_trim(audio)) under that key."
            )
        return whisper_window_utterances(
            torch.as_tensor(batch[self.input_key]), batch.get("attention_mask"), self.info, self.input_key
        )

    # ------------------------------------------------------------------ passes
    def _mel(self, features: Tensor) -> Tensor:
        return features.to(self.device, self.dtype).transpose(1, 2)

    def _ids(self, decoder_ids: Tensor, batch: int) -> Tensor:
        ids = decoder_ids.to(self.device)
        return ids.unsqueeze(0).expand(batch, -1) if ids.dim() == 1 else ids

    def _decode(self, enc: Tensor, ids: Tensor, output_attentions: bool) -> ForwardOutput:
        if not output_attentions:
            return ForwardOutput(logits=self.model.decoder(ids, enc), encoder_out=enc)
        blocks = list(self.model.decoder.blocks)
        qks: list[Tensor | None] = [None] * len(blocks)
        handles = []
        try:
            for i, block in enumerate(blocks):
                handles.append(block.cross_attn.register_forward_hook(lambda m, a, o, i=i: qks.__setitem__(i, o[1])))
            with _eager_attention():
                logits = self.model.decoder(ids, enc)
        finally:
            for h in handles:
                h.remove()
        if any(q is None for q in qks):  # (a list of Tensor | None: mypy cannot see the check below it)
            raise XAttnError(
                "A cross-attention block of the openai-whisper model returned no weights; this version of the "
                "package may not expose them (MultiHeadAttention.use_sdpa)."
            )
        ca = torch.stack([q.float().softmax(-1) for q in qks if q is not None], dim=1)  # [B, L, H, S, T']
        return ForwardOutput(logits=logits, cross_attention=ca, encoder_out=enc)

    def forward(self, features: Tensor, decoder_ids: Tensor, output_attentions: bool = True) -> ForwardOutput:
        enc = self.encode(features)
        return self._decode(enc, self._ids(decoder_ids, enc.shape[0]), output_attentions)

    def encode(self, features: Tensor) -> Tensor:
        return self.model.encoder(self._mel(features))

    def encoder_module(self) -> nn.Module:
        return self.model.encoder

    def decode(self, encoder_out: Tensor, decoder_ids: Tensor, output_attentions: bool = False) -> ForwardOutput:
        return self._decode(encoder_out, self._ids(decoder_ids, encoder_out.shape[0]), output_attentions)

    def output_head(self) -> nn.Linear:
        """The decoder's output projection as a linear layer: openai-whisper multiplies by the token embedding
        (tied weights); this layer holds that same parameter (no copy), so it follows training and ``.to()``."""
        emb = self.model.decoder.token_embedding.weight
        head = getattr(self, "_head", None)
        if head is None or head.weight is not emb:
            head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device="meta")
            head.weight = emb
            self._head = head
        return head

    def masked_decoder(
        self, encoder_out: Tensor, decoder_ids: Tensor, positions: Tensor | None = None
    ) -> MaskedDecoder:
        """Frame occlusion with each block's cross-attention keys and values projected once, plus the
        projection of a zero frame; a mask becomes an additive attention bias (``occlusion_bias``).
        Equals zeroing the frames and decoding, up to float rounding."""
        import torch.nn.functional as F

        dec = self.model.decoder
        heads = self.info.num_heads
        zero = encoder_out.new_zeros(1, 1, encoder_out.shape[-1])
        projected = []
        for block in dec.blocks:
            ca = block.cross_attn
            k = torch.cat([ca.key(encoder_out), ca.key(zero)], 1)
            v = torch.cat([ca.value(encoder_out), ca.value(zero)], 1)
            projected.append(tuple(x.view(1, x.shape[1], heads, -1).transpose(1, 2) for x in (k, v)))
        num_frames = encoder_out.shape[1]
        head = self.output_head()

        def run(keep: Tensor, at: Tensor | None = None) -> Tensor:
            upto, pos = upto_positions(decoder_ids, positions, at)
            ids = self._ids(upto, keep.shape[0])
            b, n = ids.shape
            bias = occlusion_bias(keep, num_frames).to(encoder_out.dtype)
            x = (dec.token_embedding(ids) + dec.positional_embedding[:n]).to(encoder_out.dtype)
            for block, (k, v) in zip(dec.blocks, projected):
                x = x + block.attn(block.attn_ln(x), mask=dec.mask)[0]
                ca = block.cross_attn
                q = ca.query(block.cross_attn_ln(x)).view(b, n, heads, -1).transpose(1, 2)
                o = F.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), attn_mask=bias)
                x = x + ca.out(o.transpose(1, 2).flatten(2))
                x = x + block.mlp(block.mlp_ln(x))
            x = dec.ln(at_positions(x, pos))
            if x.dtype != head.weight.dtype and "forward" not in vars(head):  # the head as loaded, in x's precision
                return F.linear(x, head.weight.to(x.dtype)).float()
            out = head(x)  # through the module: vocabulary="bf16" swaps its forward while masks run
            return out if out.dtype in (torch.float32, torch.bfloat16) else out.float()  # the KL reads bf16 itself

        return run

    def suppress(self, logp: Tensor, step: int) -> Tensor:
        """No special token but EOT is ever generated (plain text, no timestamps); nor EOT or a bare
        space as the first token (openai-whisper's own ``suppress_blank``)."""
        logp = logp.clone()
        first = self.info.eos_id + 1
        logp[:, first:] = -torch.inf
        if step == 0:
            logp[:, [self.info.eos_id, *self._space]] = -torch.inf
        return logp

    # ------------------------------------------------------------------ text
    def token_strings(self, ids: Tensor) -> list[str] | None:
        enc = getattr(self.tokenizer, "encoding", None)
        if enc is None:
            return super().token_strings(ids)
        return [enc.decode([int(i)]) for i in ids]

    def decode_text(self, ids: Tensor) -> str | None:
        keep = ids[~self.special_mask(ids)]
        return str(self.tokenizer.decode([int(i) for i in keep])).strip()


# ---------------------------------------------------------------------------- weights from Hugging Face
_HF_TO_OPENAI = [
    (r"^model\.encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^model\.decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^model\.decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^model\.encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^model\.decoder\.layer_norm\.", "decoder.ln."),
    (r"^model\.(encoder|decoder)\.conv", r"\1.conv"),
    (r"^model\.(encoder|decoder)\.layers\.(\d+)\.", r"\1.blocks.\2."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
]


def openai_whisper_from_hf(hf_model: nn.Module) -> nn.Module:
    """Build a ``whisper.model.Whisper`` with the weights of a Hugging Face
    ``WhisperForConditionalGeneration`` (parameters renamed; nothing is downloaded).

    Example::

        from transformers import WhisperForConditionalGeneration
        model = openai_whisper_from_hf(WhisperForConditionalGeneration.from_pretrained("openai/whisper-tiny.en"))
    """
    import whisper.model as wm

    cfg: Any = hf_model.config
    dims = wm.ModelDimensions(
        n_mels=cfg.num_mel_bins,
        n_audio_ctx=cfg.max_source_positions,
        n_audio_state=cfg.d_model,
        n_audio_head=cfg.encoder_attention_heads,
        n_audio_layer=cfg.encoder_layers,
        n_vocab=cfg.vocab_size,
        n_text_ctx=cfg.max_target_positions,
        n_text_state=cfg.d_model,
        n_text_head=cfg.decoder_attention_heads,
        n_text_layer=cfg.decoder_layers,
    )
    model = wm.Whisper(dims)
    state = {}
    for name, value in hf_model.state_dict().items():
        if name.startswith("proj_out"):  # tied to the token embedding
            continue
        new = name
        for pat, rep in _HF_TO_OPENAI:
            new = re.sub(pat, rep, new)
        state[new] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "encoder.positional_embedding"]:
        raise XAttnError(f"Cannot map the Hugging Face weights: missing {missing}, unexpected {unexpected}.")
    heads = getattr(hf_model.generation_config, "alignment_heads", None)
    if heads:
        set_alignment_heads(model, heads)
    return model.to(next(hf_model.parameters()).dtype).eval()


def set_alignment_heads(model: Any, heads: Sequence[Sequence[int]]) -> None:
    """Set a ``whisper.model.Whisper``'s ``alignment_heads`` buffer to the ``[layer, head]`` pairs ``heads``."""
    layers, per_layer = model.dims.n_text_layer, model.dims.n_text_head
    mask = torch.zeros(layers, per_layer, dtype=torch.bool)
    for layer, head in heads:
        if not (0 <= int(layer) < layers and 0 <= int(head) < per_layer):
            raise XAttnError(
                f"alignment head [{layer}, {head}] is outside the model's {layers} layers x {per_layer} heads."
            )
        mask[int(layer), int(head)] = True
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
