"""Adapter for NVIDIA NeMo attention-encoder-decoder models (Canary-style ``EncDecMultiTaskModel`` and
``EncDecTransfModelBPE``).

Everything model-specific about NeMo lives here: the batch it trains on (``PromptedAudioToTextMiniBatch``)
as the model batch the explainers take, the spectrogram of NeMo's own preprocessor as the input features,
the prompt (Canary's, or the BOS token), decoding through the model's own ``decoding`` or ``beam_search``, and the decoder's cross-attention
(each layer's ``second_sub_layer`` returns its probabilities, ``xatt_scores``, which a forward hook takes).
NeMo is an optional extra (``pip install "xattn_lightning[nemo]"``); nothing here imports it before a NeMo
model is seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from xattn_lightning.adapters.base import Adapter, MaskedDecoder, at_positions, upto_positions
from xattn_lightning.adapters.decoding import occlusion_bias
from xattn_lightning.adapters.records import AdapterInfo, ForwardOutput, Utterance, check_features
from xattn_lightning.batches import InputSpec
from xattn_lightning.errors import XAttnError

#: the model batch of a NeMo AED model: the waveforms and their lengths in samples (the features are the
#: model's own preprocessor's spectrogram, made in :meth:`NemoAEDAdapter.utterances`)
INPUT_KEY = "input_signal"
LENGTH_KEY = "input_signal_length"
#: Canary's prompt for English transcription with punctuation (slot tokens of ``CanaryPromptFormatter``)
CANARY_PROMPT: tuple[str, ...] = ("<|startoftranscript|>", "<|{lang}|>", "<|transcribe|>", "<|{lang}|>", "<|pnc|>")


def is_nemo_aed(model: object) -> bool:
    """True for a NeMo attention-encoder-decoder ASR/AST model (checked without importing NeMo).

    >>> is_nemo_aed(nn.Linear(1, 1))
    False
    """
    layers = getattr(getattr(getattr(model, "transf_decoder", None), "decoder", None), "layers", None)
    return (
        isinstance(model, nn.Module)
        and type(model).__module__.split(".")[0] == "nemo"
        and hasattr(model, "preprocessor")
        and hasattr(model, "encoder")
        and isinstance(layers, nn.ModuleList)
        and all(hasattr(layer, "second_sub_layer") for layer in layers)
    )


def nemo_batch(batch: Any) -> dict[str, Any] | None:
    """A NeMo training batch as the model batch (``None`` when ``batch`` is not one): a Canary
    ``PromptedAudioToTextMiniBatch`` (``labels``: the prompted transcript, padding as -100; ``text``: the
    references of its cuts) or an ``(audio, audio_lens, tokens, tokens_lens)`` tuple."""
    mini: Any = batch  # checked below as a dataclass, read by attribute
    if dataclasses.is_dataclass(batch) and hasattr(mini, "audio") and hasattr(mini, "prompted_transcript"):
        ids, lens = mini.prompted_transcript, mini.prompted_transcript_lens
        labels = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device)[None] >= lens[:, None], -100)
        out: dict[str, Any] = {INPUT_KEY: mini.audio, LENGTH_KEY: mini.audio_lens, "labels": labels}
        cuts = getattr(mini, "cuts", None)
        if cuts is not None:
            with contextlib.suppress(Exception):  # the references, when the cuts carry them
                out["text"] = [c.supervisions[0].text for c in cuts]
                out["id"] = [c.id for c in cuts]
        return out
    if isinstance(batch, (tuple, list)) and len(batch) == 4 and all(isinstance(t, Tensor) for t in batch):
        audio, audio_lens, tokens, tokens_lens = batch
        if audio.is_floating_point() and audio.dim() == 2 and audio_lens.dim() == 1 and not tokens.is_floating_point():
            labels = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= tokens_lens[:, None], -100)
            return {INPUT_KEY: audio, LENGTH_KEY: audio_lens, "labels": labels}
    return None


class NemoAEDAdapter(Adapter):
    """Adapter for NeMo's Canary-style ``EncDecMultiTaskModel`` and ``EncDecTransfModelBPE``.

    Batches are ``{"input_signal": [B, samples], "input_signal_length": [B]}`` (plus ``labels``: prompted
    transcripts), as :func:`nemo_batch` makes from NeMo's own batches. The features explained (input SPES) are
    the model's preprocessor's log-mel spectrogram ``[T, F]``; the encoder output is the decoder's memory
    (after the projection to the decoder's width). Cross-attention rows of the prompt tokens are dropped like any special
    token's; padded frames are never read (each utterance is explained alone, at its own length).

    Args:
        model: the NeMo model.
        tokenizer: default: the model's own (``model.tokenizer``).
        language: the prompt's source and target language (default ``"en"``).
    """

    split_passes = True

    input_key = INPUT_KEY

    def __init__(self, model: nn.Module, tokenizer: object | None = None, language: str = "en") -> None:
        if not is_nemo_aed(model):
            raise XAttnError(f"Expected a NeMo attention-encoder-decoder model but got {type(model).__name__}.")
        super().__init__(model, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None))
        self.language = language
        self._info: AdapterInfo | None = None
        self._lengths: dict[int, int] = {}

    # ------------------------------------------------------------------ facts
    @property
    def info(self) -> AdapterInfo:
        """Static facts read from the model: decoder layers and heads, mel bins, the tokenizer's special ids."""
        if self._info is None:
            tok = self.model.tokenizer
            layers = self.model.transf_decoder.decoder.layers
            special = getattr(tok, "special_tokens", None)
            special = special if isinstance(special, Mapping) else {}
            cfg = self.model.cfg
            self._info = AdapterInfo(
                num_layers=len(layers),
                num_heads=int(layers[0].second_sub_layer.num_attention_heads),
                num_mel_bins=int(cfg.preprocessor.features),
                decoder_start_id=int(tok.bos_id),
                eos_id=int(tok.eos_id),
                special_ids=frozenset(int(i) for i in special.values()) | {int(tok.pad_id), int(tok.bos_id)},
                max_target_positions=int(self.model.transf_decoder.max_sequence_length),
            )
        return self._info

    @property
    def frame_rate(self) -> float:
        """Spectrogram frames per second, from the preprocessor's ``window_stride``."""
        return 1.0 / float(self.model.cfg.preprocessor.window_stride)

    def frames_per_step(self, utterance: Utterance | None = None) -> int:
        """The encoder's subsampling factor (8 for FastConformer)."""
        return int(self.model.encoder.subsampling_factor)

    def encoder_length(self, num_frames: int) -> int:
        """Encoder frames for ``num_frames`` spectrogram frames, as the encoder's subsampling computes them."""
        if num_frames not in self._lengths:
            with torch.no_grad():
                x = torch.zeros(1, self.info.num_mel_bins, num_frames, device=self.device, dtype=self.dtype)
                _, n = self.model.encoder.pre_encode(x.transpose(1, 2), torch.tensor([num_frames], device=self.device))
            self._lengths[num_frames] = int(n[0])
        return self._lengths[num_frames]

    # ------------------------------------------------------------------ batch I/O
    def input_spec(self) -> InputSpec:
        """Waveforms ``[B, samples]`` and their lengths (the model makes its own spectrogram)."""
        vocab = getattr(self.model.tokenizer, "vocab_size", None)
        return InputSpec(INPUT_KEY, (None,), vocab_size=int(vocab) if vocab else None, length_key=LENGTH_KEY)

    def model_batch(self, batch: Any) -> dict[str, Any]:
        """NeMo's own batches (:func:`nemo_batch`) as they are; any other layout by what it holds."""
        native = nemo_batch(batch)
        return native if native is not None else super().model_batch(batch)

    def utterances(self, batch: Mapping[str, Tensor]) -> list[Utterance]:
        """The batch's utterances as the model's preprocessor's spectrograms ``[T, F]``, each at its own length."""
        audio = batch.get(INPUT_KEY)
        if not isinstance(audio, Tensor) or audio.dim() != 2:
            got = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
            raise XAttnError(
                f"Expected {INPUT_KEY!r}: waveforms [batch, samples] (and {LENGTH_KEY!r}) but got {got}; NeMo batches "
                "(PromptedAudioToTextMiniBatch, (audio, audio_lens, tokens, tokens_lens)) are read as they are."
            )
        check_features(audio, repr(INPUT_KEY))
        lens = torch.as_tensor(batch.get(LENGTH_KEY, torch.full((audio.shape[0],), audio.shape[1])))
        with torch.no_grad(), self.capture_context():
            feats, flens = self.model.preprocessor(
                input_signal=audio.to(self.device, self.dtype), length=lens.to(self.device).long()
            )
        out = []
        for b in range(audio.shape[0]):
            n = int(flens[b])
            if n < 1 or self.encoder_length(n) < 1:
                raise XAttnError(f"Utterance {b} has {n} spectrogram frames, too short for the encoder; drop it.")
            out.append(Utterance(features=feats[b, :, :n].T.contiguous(), num_frames=n, index=b))
        return out

    # ------------------------------------------------------------------ passes
    def encode(self, features: Tensor) -> Tensor:
        """The decoder's memory ``[B, T', D]`` for spectrograms ``[B, T, F]`` (the model's own forward)."""
        x = features.transpose(1, 2)
        lengths = torch.full((x.shape[0],), x.shape[2], device=x.device, dtype=torch.long)
        _, _, states, _ = self.model(processed_signal=x, processed_signal_length=lengths)
        return states

    def encoder_module(self) -> nn.Module | None:
        """The encoder, its projection to the decoder and the optional Transformer encoder."""
        m = self.model
        projection = getattr(m, "encoder_decoder_proj", None) or getattr(m, "adapter", None)  # Canary, TransfBPE
        parts = [m.encoder, projection] + ([m.transf_encoder] if getattr(m, "use_transf_encoder", False) else [])
        return nn.ModuleList(parts)

    def decode(self, encoder_out: Tensor, decoder_ids: Tensor, output_attentions: bool = False) -> ForwardOutput:
        """The Transformer decoder over ``encoder_out``, with each layer's cross-attention when asked."""
        b = encoder_out.shape[0]
        ids = decoder_ids.to(encoder_out.device)
        ids = ids.unsqueeze(0).expand(b, -1) if ids.dim() == 1 else ids
        enc_mask = torch.ones(b, encoder_out.shape[1], device=encoder_out.device, dtype=encoder_out.dtype)
        dec_mask = torch.ones(ids.shape, device=ids.device, dtype=ids.dtype)
        with self._capture(output_attentions) as store:
            hidden = self.model.transf_decoder(
                input_ids=ids, decoder_mask=dec_mask, encoder_embeddings=encoder_out, encoder_mask=enc_mask
            )
        logp = self.model.log_softmax(hidden_states=hidden)  # log-probabilities: their log-softmax is themselves
        xattn = torch.stack(store, dim=1) if output_attentions else None  # [B, L, H, S, T']
        return ForwardOutput(logits=logp, cross_attention=xattn, encoder_out=encoder_out)

    def masked_decoder(
        self, encoder_out: Tensor, decoder_ids: Tensor, positions: Tensor | None = None
    ) -> MaskedDecoder:
        """Frame occlusion without re-projecting the encoder output: each decoder layer's cross-attention keys
        and values are projected once, with one more row, the projection of a zero frame; a mask becomes an
        additive attention bias (:func:`~xattn_lightning.adapters.decoding.occlusion_bias`). Equals zeroing the
        frames and decoding (``Adapter.masked_decoder``) up to float rounding; only the explained
        ``positions`` reach the vocabulary."""
        attns = [layer.second_sub_layer for layer in self.model.transf_decoder.decoder.layers]
        with_zero = torch.cat([encoder_out, encoder_out.new_zeros(1, 1, encoder_out.shape[-1])], 1)
        projected = [
            (
                m.transpose_for_scores(m.key_net(with_zero)) / m.attn_scale,
                m.transpose_for_scores(m.value_net(with_zero)),
            )
            for m in attns
        ]
        num_frames = encoder_out.shape[1]

        def run(keep: Tensor, at: Tensor | None = None) -> Tensor:
            b = keep.shape[0]
            upto, pos = upto_positions(decoder_ids, positions, at)
            bias = occlusion_bias(keep, num_frames).to(encoder_out.dtype)

            def attend(m: Any, k: Tensor, v: Tensor) -> Callable[..., tuple[Tensor, dict]]:
                def forward(queries: Tensor, keys: Tensor, values: Tensor, attention_mask: Tensor | None) -> tuple:
                    q = m.transpose_for_scores(m.query_net(queries)) / m.attn_scale
                    probs = m.attn_dropout(torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1))
                    context = (probs @ v).permute(0, 2, 1, 3).reshape(queries.shape[0], queries.shape[1], -1)
                    return m.layer_dropout(m.out_projection(context)), {"xatt_scores": probs}  # as NeMo's own

                return forward

            for m, (k, v) in zip(attns, projected):
                m.forward = attend(m, k, v)  # the instance's forward, for this call only
            ids = upto.to(encoder_out.device)
            ids = ids.unsqueeze(0).expand(b, -1) if ids.dim() == 1 else ids
            try:
                hidden = self.model.transf_decoder(
                    input_ids=ids,
                    decoder_mask=torch.ones(ids.shape, device=ids.device, dtype=ids.dtype),
                    encoder_embeddings=encoder_out.expand(b, -1, -1),
                    encoder_mask=torch.ones(b, num_frames, device=encoder_out.device, dtype=encoder_out.dtype),
                )
            finally:
                for m in attns:
                    del m.forward
            hidden = at_positions(hidden, pos)
            return self.model.log_softmax(hidden_states=hidden)

        return run

    def forward(self, features: Tensor, decoder_ids: Tensor, output_attentions: bool = True) -> ForwardOutput:
        """Teacher-forced pass over spectrograms ``[B, T, F]``."""
        return self.decode(self.encode(features), decoder_ids, output_attentions)

    @contextlib.contextmanager
    def _capture(self, on: bool) -> Iterator[list[Tensor]]:
        """Each decoder layer's cross-attention probabilities ``[B, H, S, T']``, in layer order."""
        store: list[Tensor] = []
        hooks = []
        if on:
            for layer in self.model.transf_decoder.decoder.layers:
                hooks.append(
                    layer.second_sub_layer.register_forward_hook(lambda m, a, out: store.append(out[1]["xatt_scores"]))
                )
        try:
            yield store
        finally:
            for h in hooks:
                h.remove()

    # ------------------------------------------------------------------ targets
    def prompt_ids(self) -> list[int]:
        """Canary's prompt (start of transcript, language, task, language, punctuation) for a Canary tokenizer;
        the BOS token for a plain one (``EncDecTransfModelBPE``)."""
        tok = self.model.tokenizer
        special = getattr(tok, "special_tokens", None)
        if not isinstance(special, Mapping) or "<|startoftranscript|>" not in special:
            return [int(tok.bos_id)]
        tokens = [t.format(lang=self.language) for t in CANARY_PROMPT]
        missing = [t for t in tokens if t not in special]
        if missing:
            raise XAttnError(
                f"The model's tokenizer has no {', '.join(missing)}: pass another language= to the adapter."
            )
        return [int(special[t]) for t in tokens]

    def generate_from(self, encoder_out: Tensor, num_beams: int, max_new_tokens: int | None) -> Tensor:
        """The hypothesis of the model's own decoding (greedy unless its config says beam), prompt included."""
        prompt = torch.tensor([self.prompt_ids()], device=self.device)
        mask = torch.ones(encoder_out.shape[:2], device=self.device, dtype=encoder_out.dtype)
        decoding = getattr(self.model, "decoding", None)
        if decoding is not None and hasattr(decoding, "decode_predictions_tensor"):  # EncDecMultiTaskModel
            hyps = decoding.decode_predictions_tensor(
                encoder_hidden_states=encoder_out, encoder_input_mask=mask, decoder_input_ids=prompt,
                return_hypotheses=True,
            )  # fmt: skip
            hyp = hyps[0][0] if isinstance(hyps[0], list) else hyps[0]
            ids = torch.as_tensor(hyp.y_sequence).reshape(-1).long().cpu()
        else:  # EncDecTransfModelBPE: its beam search, which starts with the BOS token
            ids = self.model.beam_search(
                encoder_hidden_states=encoder_out, encoder_input_mask=mask, return_beam_scores=False
            )
            ids = ids[0].long().cpu()[prompt.shape[1] :]
            stop = (ids == self.info.eos_id).nonzero()
            ids = ids[: int(stop[0])] if len(stop) else ids
            ids = ids[ids != int(self.model.tokenizer.pad_id)]
        if max_new_tokens is not None:
            ids = ids[:max_new_tokens]
        eos = self.info.eos_id
        body = ids[ids != eos]
        return torch.cat([prompt[0].cpu(), body, torch.tensor([eos])])

    def token_strings(self, ids: Tensor) -> list[str] | None:
        """Token strings from the model's (aggregate) tokenizer."""
        tok = self.tokenizer
        if tok is None or not hasattr(tok, "ids_to_tokens"):
            return super().token_strings(ids)
        return [str(t).replace("\u2581", " ") for t in tok.ids_to_tokens([int(i) for i in ids])]

    def decode_text(self, ids: Tensor) -> str | None:
        """Text from the model's tokenizer, special tokens left out."""
        tok = self.tokenizer
        if tok is None or not hasattr(tok, "ids_to_text"):
            return super().decode_text(ids)
        keep = ids[~self.special_mask(ids)]
        return str(tok.ids_to_text([int(i) for i in keep])).strip()


__all__: Sequence[str] = ["NemoAEDAdapter", "is_nemo_aed", "nemo_batch"]
