"""Hook-based adapter for custom PyTorch encoder-decoders."""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from xattn_lightning.adapters.base import Adapter
from xattn_lightning.adapters.records import AdapterInfo, ForwardOutput, Utterance, check_features
from xattn_lightning.batches import InputSpec
from xattn_lightning.errors import XAttnError

ForwardFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
DecodeFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


class _Precomputed(nn.Module):
    """Stands in for the encoder while the decoder runs over a given encoder output."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        return self.output


@contextlib.contextmanager
def _swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
    """Replace the submodule ``name`` of ``model`` by ``module`` for the duration of the block."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, child)
    setattr(parent, child, module)
    try:
        yield
    finally:
        setattr(parent, child, original)


def _default_weights(module: nn.Module, output: object) -> Tensor | None:
    if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], Tensor):
        return output[1]
    return None


def _call_model(model: nn.Module, features: Tensor, decoder_ids: Tensor) -> Tensor:
    return model(features, decoder_ids)


class HookAdapter(Adapter):
    """Reads cross-attention out of any encoder-decoder through forward hooks.

    Args:
        model: the encoder-decoder.
        encoder: dotted name of the encoder module; its output (``[B, T', D]``, or ``[T', B, D]``
            with ``batch_first=False``) is the encoder output H.
        cross_attention: dotted names (glob patterns allowed, e.g. ``"decoder.layers.*.multihead_attn"``)
            of the cross-attention modules, in layer order. ``nn.MultiheadAttention`` modules are
            asked for per-head weights even when their caller passes ``need_weights=False``.
        forward: ``forward(model, features [B, T, F], decoder_ids [B, S]) -> logits [B, S, V]``.
            Defaults to ``model(features, decoder_ids)``.
        decoder_start_id, eos_id: the decoder's start and end tokens.
        special_ids: other ids never explained (language/task tags...).
        frames_per_step: input frames per encoder frame; inferred from the encoder's output length
            when omitted.
        num_mel_bins: feature size F (checked on input when given; otherwise taken from the first
            batch, and later batches must match it).
        max_target_positions: longest decoder sequence the model accepts.
        tokenizer: optional; an object with ``convert_ids_to_tokens``/``decode`` or a callable id -> str.
        input_key: batch key of the features ``[B, T, F]``; ``"lengths"`` or ``"attention_mask"``
            give valid lengths.
        weights_fn: ``weights_fn(module, output) -> Tensor[B, H, S, T']`` for attention modules
            that are not ``nn.MultiheadAttention``.
        decode: ``decode(model, encoder_out [B, T', D], decoder_ids [B, S]) -> logits [B, S, V]``:
            runs the decoder alone over a given encoder output (encoder-output saliency). Without
            it, ``forward`` runs with the ``encoder`` submodule swapped, for that call only, for a
            module that returns the given output (restored in a ``finally`` block).

    Hooks live only for one call and are removed in ``finally`` blocks, also when the forward raises.

    Example:
        >>> from xattn_lightning.testing import TinyS2T
        >>> model = TinyS2T(vocab_size=12)
        >>> a = HookAdapter(model, encoder="encoder", cross_attention="decoder.layers.*.multihead_attn",
        ...                 decoder_start_id=1, eos_id=2)
        >>> a.info.num_layers
        2
    """

    split_passes = True

    def __init__(
        self,
        model: nn.Module,
        encoder: str,
        cross_attention: str | Sequence[str],
        forward: ForwardFn | None = None,
        decoder_start_id: int = 1,
        eos_id: int = 2,
        special_ids: Sequence[int] = (),
        frames_per_step: int | None = None,
        num_mel_bins: int | None = None,
        max_target_positions: int | None = None,
        tokenizer: object | None = None,
        input_key: str = "input_features",
        batch_first: bool = True,
        weights_fn: Callable[[nn.Module, object], Tensor | None] | None = None,
        num_heads: int | None = None,
        decode: DecodeFn | None = None,
    ) -> None:
        super().__init__(model, tokenizer)
        model = self.model  # unwrapped from torch.compile
        names = dict(model.named_modules())
        if not encoder or encoder not in names:
            raise XAttnError(f"The model has no module named {encoder!r}; pass the encoder's dotted name.")
        self.encoder = names[encoder]
        self._encoder_name = encoder
        self._decode_fn = decode
        patterns = [cross_attention] if isinstance(cross_attention, str) else list(cross_attention)
        mods: list[nn.Module] = []
        for pat in patterns:
            hit = [m for n, m in names.items() if fnmatch.fnmatchcase(n, pat)]
            if not hit:
                raise XAttnError(
                    f"No module matches {pat!r}. Cross-attention modules of this model might be: "
                    f"{[n for n, m in names.items() if isinstance(m, nn.MultiheadAttention)][:8]}."
                )
            mods.extend(hit)
        self.cross_modules = mods
        self.input_key = input_key
        self._forward_fn = forward or _call_model
        self._frames_per_step = frames_per_step
        self._batch_first = batch_first
        self._weights_fn = weights_fn or _default_weights
        heads = num_heads or getattr(mods[0], "num_heads", None)
        if heads is None:
            raise XAttnError("Cannot read the number of heads from the attention modules; pass num_heads=.")
        self._bins_given = bool(num_mel_bins)
        self._info = AdapterInfo(
            num_layers=len(mods),
            num_heads=int(heads),
            num_mel_bins=int(num_mel_bins or 0),
            decoder_start_id=int(decoder_start_id),
            eos_id=int(eos_id),
            special_ids=frozenset(int(i) for i in special_ids),
            max_target_positions=max_target_positions,
        )

    @property
    def info(self) -> AdapterInfo:
        return self._info

    def input_spec(self) -> InputSpec:
        return replace(super().input_spec(), length_key="lengths")

    def frames_per_step(self, utterance: Utterance | None = None) -> int:
        if self._frames_per_step is None:
            if utterance is None:
                raise XAttnError("frames_per_step is inferred from an utterance; pass one or set it explicitly.")
            t = utterance.features.shape[0]
            with torch.no_grad(), self.capture_context():
                t_enc = self.encode(utterance.features.unsqueeze(0)).shape[1]
            self._frames_per_step = max(1, round(t / t_enc))
        return self._frames_per_step

    def encoder_length(self, num_frames: int) -> int:
        return math.ceil(num_frames / (self._frames_per_step or 1))

    def utterances(self, batch: Mapping[str, Tensor]) -> list[Utterance]:
        if isinstance(batch, Tensor):
            batch = {self.input_key: batch}
        if not isinstance(batch, Mapping) or self.input_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise XAttnError(
                f"The batch has no {self.input_key!r} (got {keys}); pass features [B, T, F] under that key "
                "or set HookAdapter(input_key=...)."
            )
        x = torch.as_tensor(batch[self.input_key])
        if x.dim() != 3:
            raise XAttnError(f"Expected {self.input_key!r} of shape [B, T, F] but got {tuple(x.shape)}.")
        self._check_bins(x)
        check_features(x, f"{self.input_key!r}")
        if "lengths" in batch:
            lengths = [int(v) for v in torch.as_tensor(batch["lengths"])]
        elif "attention_mask" in batch:
            lengths = [int(v) for v in torch.as_tensor(batch["attention_mask"]).sum(-1)]
        else:
            lengths = [x.shape[1]] * x.shape[0]
        out = []
        for b, n in enumerate(lengths):
            if n < 1:
                raise XAttnError(f"Utterance {b} has no frames; drop it from the batch.")
            out.append(Utterance(features=x[b, :n].contiguous(), num_frames=n, index=b))
        return out

    def _check_bins(self, x: Tensor) -> None:
        """Features must have the model's feature size; when it was not given, the first batch sets it."""
        if not self.info.num_mel_bins:
            self._info = replace(self._info, num_mel_bins=int(x.shape[-1]))
        elif x.shape[-1] != self.info.num_mel_bins:
            raise XAttnError(
                f"Expected {self.info.num_mel_bins} feature bins but got {x.shape[-1]}"
                + ("." if self._bins_given else " (the size of the first batch this adapter saw).")
            )

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def _hooks(self, capture: bool) -> Iterator[dict]:
        store: dict = {"attn": [None] * len(self.cross_modules), "enc": None}
        handles = []
        try:
            handles.append(self.encoder.register_forward_hook(lambda m, a, o: store.__setitem__("enc", o)))
            if capture:
                for i, mod in enumerate(self.cross_modules):
                    if isinstance(mod, nn.MultiheadAttention):

                        def pre(m: nn.Module, args: tuple, kwargs: dict) -> tuple:
                            kwargs = dict(kwargs)
                            kwargs["need_weights"] = True
                            kwargs["average_attn_weights"] = False
                            return args, kwargs

                        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))

                    def post(m: nn.Module, args: tuple, output: object, i: int = i) -> None:
                        store["attn"][i] = self._weights_fn(m, output)

                    handles.append(mod.register_forward_hook(post))
            yield store
        finally:
            for h in handles:
                h.remove()

    def _enc_out(self, o: object) -> Tensor:
        if isinstance(o, (tuple, list)):
            o = o[0]
        if hasattr(o, "last_hidden_state"):
            o = o.last_hidden_state
        if not isinstance(o, Tensor):
            raise XAttnError(
                "The encoder module did not return a tensor; point `encoder=` at the module whose output is H."
            )
        return o if self._batch_first else o.transpose(0, 1)

    def _collect(self, store: dict) -> Tensor:
        attn = store["attn"]
        if any(a is None for a in attn):
            raise XAttnError(
                "A cross-attention module returned no weights; for modules other than nn.MultiheadAttention "
                "pass weights_fn=(module, output) -> Tensor[B, H, S, T']."
            )
        ca = torch.stack(attn, dim=1)
        if ca.dim() == 4:  # head-averaged weights [B, L, S, T']
            ca = ca.unsqueeze(2)
        return ca

    def _run(self, call: Callable[[], object], capture: bool, encoder_out: Tensor | None = None) -> ForwardOutput:
        """Run ``call`` under the hooks; ``encoder_out`` when the encoder output is given, not computed."""
        with self._hooks(capture) as store:
            logits = call()
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        ca = self._collect(store) if capture else None
        enc = self._enc_out(store["enc"]) if encoder_out is None else encoder_out
        if not isinstance(logits, Tensor):
            raise XAttnError(f"{type(self.model).__name__} returned {type(logits).__name__}, not logits (a Tensor).")
        return ForwardOutput(logits=logits, cross_attention=ca, encoder_out=enc)

    def forward(self, features: Tensor, decoder_ids: Tensor, output_attentions: bool = True) -> ForwardOutput:
        x = features.to(self.device, self.dtype)
        self._check_bins(x)
        ids = decoder_ids.to(self.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(x.shape[0], -1)
        return self._run(lambda: self._forward_fn(self.model, x, ids), output_attentions)

    def encode(self, features: Tensor) -> Tensor:
        x = features.to(self.device, self.dtype)
        with self._hooks(False) as store:
            try:
                self._forward_fn(
                    self.model, x, torch.full((x.shape[0], 1), self.info.decoder_start_id, device=x.device)
                )
            except Exception as err:  # pragma: no cover - depends on the user's model
                if store["enc"] is None:
                    raise XAttnError(f"Running the model to read its encoder output failed: {err}") from err
        return self._enc_out(store["enc"])

    def encoder_module(self) -> nn.Module:
        # the hooked encoder submodule may be fed by other weights (a front-end outside it): only the
        # whole model's weights decide its output for certain
        return self.model

    def decode(self, encoder_out: Tensor, decoder_ids: Tensor, output_attentions: bool = False) -> ForwardOutput:
        ids = decoder_ids.to(self.device)
        b = encoder_out.shape[0]
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(b, -1)
        decode_fn = self._decode_fn
        if decode_fn is not None:
            return self._run(lambda: decode_fn(self.model, encoder_out, ids), output_attentions, encoder_out)
        # the encoder is swapped out; the features only carry batch size, feature size, device and dtype
        if not self.info.num_mel_bins:
            raise XAttnError("HookAdapter.decode needs the feature size: pass num_mel_bins= or explain a batch first.")
        dummy = torch.zeros(b, 1, self.info.num_mel_bins, device=encoder_out.device, dtype=encoder_out.dtype)
        enc = encoder_out if self._batch_first else encoder_out.transpose(0, 1)
        with _swapped(self.model, self._encoder_name, _Precomputed(enc)):
            return self._run(lambda: self._forward_fn(self.model, dummy, ids), output_attentions, encoder_out)
