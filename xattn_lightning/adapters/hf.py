"""What the Hugging Face encoder-decoder speech adapters share (:mod:`~xattn_lightning.adapters.hf_whisper`,
:mod:`~xattn_lightning.adapters.hf_speech2text`): eager attention for the weights, encoder outputs reused,
frame occlusion over cached cross-attention keys and values, and generation from the forced prompt."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from xattn_lightning.adapters.base import Adapter, MaskedDecoder, at_positions, unwrap_tokenizer, upto_positions
from xattn_lightning.adapters.decoding import occlusion_bias
from xattn_lightning.adapters.records import AdapterInfo, ForwardOutput, Utterance, check_features
from xattn_lightning.errors import XAttnError


def conv_output_length(n: int, convs: list[nn.Conv1d]) -> int:
    """Length after a stack of 1-D convolutions, from their own kernel/stride/padding/dilation.

    >>> conv_output_length(3000, [nn.Conv1d(1, 1, 3, padding=1), nn.Conv1d(1, 1, 3, stride=2, padding=1)])
    1500
    """
    for c in convs:
        if c.padding == "same":  # the length is kept (PyTorch allows "same" with stride 1 only)
            continue
        k, s, d = c.kernel_size[0], c.stride[0], c.dilation[0]
        p = 0 if isinstance(c.padding, str) else c.padding[0]  # "valid": no padding
        n = (n + 2 * p - d * (k - 1) - 1) // s + 1
    return max(int(n), 0)


def _cache_keyword(model: nn.Module) -> str:
    """``cache`` in transformers >= 5.x (``past_key_values`` deprecated), ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_shared(cache: Any, layer: int, keys: Tensor, values: Tensor) -> None:
    """Put ``keys``/``values`` (expanded views shared by all masks) into ``cache`` for ``layer``
    without copying them: ``DynamicCache.update`` concatenates onto an empty tensor, which would
    materialise the expanded batch (measured: 4x slower masks on CPU)."""
    cache.update(keys[:1], values[:1], layer)
    layers = getattr(cache, "layers", None)
    if layers is not None and hasattr(layers[layer], "keys"):  # transformers >= 4.56
        layers[layer].keys, layers[layer].values = keys, values
    elif hasattr(cache, "key_cache"):  # older transformers
        cache.key_cache[layer], cache.value_cache[layer] = keys, values
    else:  # pragma: no cover - an unknown cache layout: copy, as update does
        cache.update(keys[1:], values[1:], layer)


def _tokenizer_special_ids(tokenizer: object | None) -> set[int]:
    tok = unwrap_tokenizer(tokenizer)
    ids = getattr(tok, "all_special_ids", None) or []
    return {int(i) for i in ids}


def register_output_capture(model: nn.Module) -> None:
    """Make sure transformers can return ``model``'s attention weights in this process.

    transformers 5 records attention weights through hooks whose specification it keeps in a
    process-wide registry, filled when a model is *constructed*. A model that reaches a process
    unpickled (the workers of ``ddp_spawn``, a model loaded with ``torch.load``) was never constructed
    there, so ``output_attentions=True`` returns no weights at all. This puts each model class's
    specification back (the registry is private: nothing happens where it does not exist, as before
    transformers 5).
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers 4: attention weights come back without a registry
        return
    for module in model.modules():
        spec = getattr(module, "_can_record_outputs", None)
        if spec and not _CAN_RECORD_REGISTRY.get(module):  # type: ignore[arg-type]  # a PreTrainedModel: it has the spec
            _CAN_RECORD_REGISTRY[module] = spec  # type: ignore[index]


class _HFSeq2SeqAdapter(Adapter):
    """Shared code for HF encoder-decoder speech models (eager attention, encoder_outputs reuse)."""

    split_passes = True

    def __init__(self, model: nn.Module, tokenizer: object | None = None) -> None:
        super().__init__(model, tokenizer)
        self._convs = self._find_convs()
        self._info = self._read_info()

    # subclasses
    def _find_convs(self) -> list[nn.Conv1d]:
        raise NotImplementedError

    def _read_info(self) -> AdapterInfo:
        raise NotImplementedError

    def _to_model(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def info(self) -> AdapterInfo:
        return self._info

    def frames_per_step(self, utterance: Utterance | None = None) -> int:
        return int(math.prod(c.stride[0] for c in self._convs))

    def encoder_length(self, num_frames: int) -> int:
        return conv_output_length(num_frames, self._convs)

    def default_tokenizer(self) -> object | None:
        """The tokenizer saved beside the model (``name_or_path``), loaded from local files only."""
        path = getattr(self.model, "name_or_path", None) or getattr(self.model.config, "_name_or_path", None)
        if not path:
            return None
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # not saved with the model, or not in the local cache
            return None

    @contextlib.contextmanager
    def _eager(self) -> Iterator[None]:
        """Eager attention (the only kernel that returns weights) for the call, restored afterwards."""
        register_output_capture(self.model)
        prev = getattr(self.model.config, "_attn_implementation", None)
        switched = prev is not None and prev != "eager"
        try:
            if switched:
                self.model.set_attn_implementation("eager")
            yield
        finally:
            if switched:
                self.model.set_attn_implementation(prev)

    def _check_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(batch, Mapping):
            raise XAttnError(f"Expected the batch to be a dict of tensors but got {type(batch).__name__}.")
        if self.input_key not in batch:
            raise XAttnError(
                f"The batch has no {self.input_key!r} (keys: {sorted(batch)}); pass the output of the model's "
                f"processor/feature extractor, e.g. processor(audio, sampling_rate=16000, return_tensors='pt', "
                "return_attention_mask=True)."
            )
        x = torch.as_tensor(batch[self.input_key])
        if x.dim() != 3:
            raise XAttnError(
                f"Expected {self.input_key!r} of rank 3 (batch, ...) but got shape {tuple(x.shape)}; "
                "add a batch dimension with .unsqueeze(0) for a single utterance."
            )
        check_features(x, f"{self.input_key!r}")
        return x

    def forward(self, features: Tensor, decoder_ids: Tensor, output_attentions: bool = True) -> ForwardOutput:
        x = self._to_model(features.to(self.device, self.dtype))
        return self._call(decoder_ids, x.shape[0], output_attentions, input_features=x)

    def _call(self, decoder_ids: Tensor, batch: int, output_attentions: bool, **inputs: Any) -> ForwardOutput:
        """One teacher-forced pass over ``inputs`` (features or encoder outputs); eager attention
        only while the weights are captured."""
        ids = decoder_ids.to(self.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(batch, -1)
        with self._eager() if output_attentions else contextlib.nullcontext():
            out = self.model(
                **inputs, decoder_input_ids=ids, output_attentions=output_attentions, use_cache=False, return_dict=True
            )
        ca = self._stack_cross(out.cross_attentions) if output_attentions else None
        return ForwardOutput(logits=out.logits, cross_attention=ca, encoder_out=out.encoder_last_hidden_state)

    def _stack_cross(self, cross: tuple[Tensor, ...] | None) -> Tensor:
        if not cross or any(c is None for c in cross):
            raise XAttnError(
                f"{type(self.model).__name__} returned no cross-attention weights although eager attention was "
                "requested; load it with attn_implementation='eager'."
            )
        return torch.stack(list(cross), dim=1)

    def encode(self, features: Tensor) -> Tensor:
        x = self._to_model(features.to(self.device, self.dtype))
        return self.model.get_encoder()(x, return_dict=True).last_hidden_state

    def encoder_module(self) -> nn.Module:
        return self.model.get_encoder()

    def decode(self, encoder_out: Tensor, decoder_ids: Tensor, output_attentions: bool = False) -> ForwardOutput:
        from transformers.modeling_outputs import BaseModelOutput

        hidden = BaseModelOutput(last_hidden_state=encoder_out)
        return replace(
            self._call(decoder_ids, encoder_out.shape[0], output_attentions, encoder_outputs=hidden),
            encoder_out=encoder_out,
        )

    def masked_decoder(
        self, encoder_out: Tensor, decoder_ids: Tensor, positions: Tensor | None = None
    ) -> MaskedDecoder:
        """Frame occlusion without re-projecting the encoder output. Each decoder layer's
        cross-attention keys and values are projected once, with one more row: the projection of a
        zero frame. A mask becomes an additive attention bias (:func:`occlusion_bias`): occluded frames
        out, the zero frame weighted by their number. Equals zeroing the frames and decoding
        (``Adapter.masked_decoder``) up to float rounding; the model's own cross-attention cache
        carries the shared keys and values, a pre-hook the bias."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        layers = list(self.model.get_decoder().layers)
        zero = encoder_out.new_zeros(1, 1, encoder_out.shape[-1])
        heads, head_dim = layers[0].encoder_attn.num_heads, layers[0].encoder_attn.head_dim
        projected = []
        for layer in layers:
            attn = layer.encoder_attn
            k = torch.cat([attn.k_proj(encoder_out), attn.k_proj(zero)], 1)
            v = torch.cat([attn.v_proj(encoder_out), attn.v_proj(zero)], 1)
            projected.append(tuple(x.view(1, -1, heads, head_dim).transpose(1, 2) for x in (k, v)))
        cache_kw = _cache_keyword(self.model)
        num_frames = encoder_out.shape[1]
        head = self.model.get_output_embeddings()

        def run(keep: Tensor, at: Tensor | None = None) -> Tensor:
            b = keep.shape[0]
            ids, pos = upto_positions(decoder_ids, positions, at)
            bias = occlusion_bias(keep, num_frames).to(encoder_out.dtype)
            cross = DynamicCache()
            for i, (k, v) in enumerate(projected):
                _cache_shared(cross, i, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
            cache = EncoderDecoderCache(DynamicCache(), cross)
            for i in range(len(layers)):
                cache.is_updated[i] = True  # use the cached cross keys/values, do not project again

            def with_bias(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
                return args, {**kwargs, "attention_mask": bias}

            handles = [layer.encoder_attn.register_forward_pre_hook(with_bias, with_kwargs=True) for layer in layers]
            if pos is not None and head is not None:  # only the explained positions reach the vocabulary
                handles.append(head.register_forward_pre_hook(lambda m, a: (at_positions(a[0], pos), *a[1:])))
            ids = ids.to(self.device)
            ids = ids.unsqueeze(0).expand(b, -1) if ids.dim() == 1 else ids
            try:
                out = self.model(
                    encoder_outputs=BaseModelOutput(last_hidden_state=encoder_out.expand(b, -1, -1)),
                    decoder_input_ids=ids,
                    use_cache=True,
                    return_dict=True,
                    **{cache_kw: cache},
                )
            finally:
                for h in handles:
                    h.remove()
            if pos is not None and head is None:
                return at_positions(out.logits, pos)
            return out.logits

        return run

    def generate_from(self, encoder_out: Tensor, num_beams: int, max_new_tokens: int | None) -> Tensor:
        """The model's own ``generate`` (plain seq2seq search from the forced prompt)."""
        from transformers import GenerationMixin
        from transformers.modeling_outputs import BaseModelOutput

        # synced_gpus=False: the monitor generates on each process alone (a sharded model through an unsharded
        # copy), so generation must never wait on the other processes, whatever marks the model carries
        kwargs: dict = {"num_beams": num_beams, "do_sample": False, "synced_gpus": False}
        prompt = torch.tensor([self.prompt_ids()], device=self.device)
        if max_new_tokens is not None:  # as max_length: the model's config already sets one
            limit = self.info.max_target_positions or 10**9
            kwargs["max_length"] = min(limit, prompt.shape[1] + max_new_tokens)
        # plain seq2seq generation from the forced prompt (language/task/no-timestamps): Whisper's own
        # generate() adds long-form segmentation and strips the prompt, which explanation does not want
        seq = GenerationMixin.generate(
            self.model,
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_out),
            decoder_input_ids=prompt,
            **kwargs,
        )
        if not isinstance(seq, Tensor):
            seq = seq.sequences
        return self.normalize_target(seq[0].cpu())

    def normalize_target(self, ids: Tensor | Sequence[int]) -> Tensor:
        return self.with_prompt(super().normalize_target(ids))
