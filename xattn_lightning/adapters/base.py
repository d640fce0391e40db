"""The adapter contract: the only code that knows a model family.

Canonical layouts used everywhere above the adapters:

- input features ``[B, T, F]`` (time, frequency), whatever the model's own layout;
- cross-attention ``[B, L, H, S, T']`` (layers, heads, decoder positions, encoder frames);
- a decoder sequence ``[S + 1]`` that starts with the decoder start token: position ``j`` of a
  teacher-forced pass over ``seq[:-1]`` predicts ``seq[j + 1]``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from xattn_lightning.adapters.decoding import generic_generate
from xattn_lightning.adapters.records import AdapterInfo, ForwardOutput, Utterance
from xattn_lightning.batches import InputSpec, standard_batch
from xattn_lightning.errors import XAttnError

#: input frames per second of features whose model does not say (100: a 10 ms hop, Whisper's and most filterbanks')
DEFAULT_FRAME_RATE = 100.0


def unwrap_tokenizer(obj: Any) -> Any:
    """The tokenizer inside a processor (``.tokenizer``), or ``obj`` itself: the one place that
    knows processors wrap tokenizers.

    >>> class Processor: tokenizer = "tok"
    >>> unwrap_tokenizer(Processor()), unwrap_tokenizer("tok")
    ('tok', 'tok')
    """
    return getattr(obj, "tokenizer", obj)


def uncompiled(model: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``, which shares
    its parameters), or ``model`` itself. Explanations run the eager module: its hooks and
    attention switches would only make the compiled one recompile.

    >>> m = nn.Linear(2, 2)
    >>> uncompiled(m) is m
    True
    """
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return model
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model



class MaskedDecoder(Protocol):
    """What :meth:`Adapter.masked_decoder` returns: ``run(keep [B, t]) -> logits``, and with ``at`` only those
    decoder positions (``[P]``, or ``[B, P]``: each mask its own), the decoder run no further than the last of
    them."""

    def __call__(self, keep: Tensor, at: Tensor | None = None) -> Tensor:
        """Logits of the decoder with the frames where ``keep`` is False occluded."""
        ...

class Adapter(ABC):
    """Turns a model into the operations the explainers need.

    Subclasses implement feature I/O, the teacher-forced pass and (optionally) a decoder-only
    pass over a given encoder output. Everything runs on the model's device and dtype.
    """

    #: key of the input features in the model's own batch dict
    input_key: str = "input_features"
    #: capability: separate encoder and decoder passes (:meth:`encode`, :meth:`decode`), which encoder-output
    #: saliency, the shared encoder pass and :class:`~xattn_lightning.encoder_cache.EncoderCache` need
    split_passes: bool = False
    #: where :func:`~xattn_lightning.adapters.adapter_for` found the model when it searched all
    #: submodules (a dotted name), else ``None``
    found_at: str | None = None

    def __init__(self, model: nn.Module, tokenizer: object | None = None) -> None:
        #: the model explained (typed ``Any``: each adapter reads its own family's attributes)
        self.model: Any = uncompiled(model)  # a torch.compile wrapper: explain through the eager module
        #: the tokenizer or processor (each family's own interface)
        self.tokenizer: Any = tokenizer

    # ------------------------------------------------------------------ a training script's batches
    def input_spec(self) -> InputSpec:
        """What this model takes, so that its features and labels are found in any batch layout by what they
        are (:func:`~xattn_lightning.batches.standard_batch`): Whisper's ``[n_mels, window]`` features, else
        frames ``[T, n_mels]``."""
        info = self.info
        bins = info.num_mel_bins or None
        if info.fixed_num_frames:
            return InputSpec(self.input_key, (bins, info.fixed_num_frames), time_dim=1, vocab_size=info.vocab_size)
        return InputSpec(self.input_key, (None, bins), time_dim=0, vocab_size=info.vocab_size)

    def model_batch(self, batch: Any) -> dict[str, Any]:
        """A training script's ``batch``, in any layout :func:`~xattn_lightning.batches.standard_batch` reads
        (a dict under any key names, tuples, dataclasses, nested one level), as this model's batch dict."""
        return standard_batch(batch, self.input_spec())

    # ------------------------------------------------------------------ alignment heads (word timestamps)
    def alignment_heads(self) -> list[list[int]] | None:
        """The ``[layer, head]`` pairs the model's own word timestamps use (``None``: it has none). By default
        the Hugging Face convention, a ``generation_config.alignment_heads``, which any model may follow."""
        heads = getattr(getattr(self.model, "generation_config", None), "alignment_heads", None)
        return [[int(x) for x in h] for h in heads] if heads else None

    def set_alignment_heads(self, heads: Sequence[Sequence[int]]) -> str:
        """Make the model's own word timestamps use ``heads``; returns where they were written. By default
        into ``generation_config.alignment_heads`` (a Hugging Face Whisper's ``generate(return_token_timestamps=
        True)``, pipelines and ``save_pretrained`` use them); ``NotImplementedError`` for a model without one."""
        cfg = getattr(self.model, "generation_config", None)
        if cfg is None:
            raise NotImplementedError(
                f"{type(self.model).__name__} has no generation_config to write alignment_heads into."
            )
        cfg.alignment_heads = [[int(x) for x in h] for h in heads]
        return "generation_config.alignment_heads"

    # ------------------------------------------------------------------ facts
    @property
    def frame_rate(self) -> float:
        """Input feature frames per second: 100 (a 10-ms hop) for every log-mel front end the package knows;
        an adapter whose model says otherwise reads it from the model. SPES segments time and figures and word
        timestamps count seconds with it."""
        return DEFAULT_FRAME_RATE

    @property
    @abstractmethod
    def info(self) -> AdapterInfo:
        """Static facts about the model."""

    @abstractmethod
    def frames_per_step(self, utterance: Utterance | None = None) -> int:
        """Input frames per encoder frame (the subsampling factor), read from the model."""

    @abstractmethod
    def encoder_length(self, num_frames: int) -> int:
        """Valid encoder frames for ``num_frames`` valid input frames."""

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model's parameters."""
        for p in self.model.parameters():
            if torch.is_floating_point(p):
                return p.dtype
        return torch.float32

    # ------------------------------------------------------------------ batch I/O
    @abstractmethod
    def utterances(self, batch: Mapping[str, Tensor]) -> list[Utterance]:
        """Split a batch in the model's own format into utterances (valid lengths found)."""

    # ------------------------------------------------------------------ passes
    @abstractmethod
    def forward(self, features: Tensor, decoder_ids: Tensor, output_attentions: bool = True) -> ForwardOutput:
        """Teacher-forced pass: ``features [B, T, F]``, ``decoder_ids [B, S]`` or ``[S]`` (shared)."""

    def encode(self, features: Tensor) -> Tensor:
        """Encoder output ``[B, T', D]`` for ``features [B, T, F]``."""
        raise NotImplementedError(f"{type(self).__name__} does not support encoder-only passes (split_passes=False).")

    def encoder_module(self) -> nn.Module | None:
        """A module whose weights decide :meth:`encode`'s output (all of them: front-end included);
        ``None`` when the adapter has no separate encoder, which turns off caching encoder outputs
        (:class:`~xattn_lightning.encoder_cache.EncoderCache`)."""
        return None

    def decode(self, encoder_out: Tensor, decoder_ids: Tensor, output_attentions: bool = False) -> ForwardOutput:
        """Decoder-only pass over a given encoder output ``[B, T', D]``."""
        raise NotImplementedError(f"{type(self).__name__} does not support decoder-only passes (split_passes=False).")

    def output_head(self) -> nn.Linear | None:
        """The linear layer that projects the decoder's last hidden states onto the vocabulary in
        :meth:`masked_decoder`'s passes, called as a module (so that ``vocabulary="bf16"`` can take its place while
        the masks run: :mod:`~xattn_lightning.saliency.vocabulary`); ``None`` when the model has none. The default:
        a Hugging Face model's ``get_output_embeddings()``, when it is an ``nn.Linear``.

        >>> from xattn_lightning.testing import TinyS2T
        >>> TinyS2T.adapter(TinyS2T(vocab_size=12)).output_head() is None
        True
        """
        model: Any = self.model
        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        return head if isinstance(head, nn.Linear) else None

    def masked_decoder(
        self, encoder_out: Tensor, decoder_ids: Tensor, positions: Tensor | None = None
    ) -> MaskedDecoder:
        """``run(keep [B, t]) -> logits [B, S, V]``: decoder-only passes over ``encoder_out [1, T', D]``
        with the first ``t`` encoder frames zeroed where ``keep`` is False (frame occlusion).
        With ``positions``, only those decoder positions' logits: ``[B, P, V]``. ``run(keep, at=...)``: only the
        positions ``at`` for this call (``[P]``, or ``[B, P]``: each mask row its own, so that only they reach the
        vocabulary), the decoder run no further than the last of them (it is causal: later tokens change no
        earlier logit).

        The default zeroes the frames and calls :meth:`decode`; adapters that can, project the
        cross-attention keys and values once and mask their rows instead, and project only the
        asked positions onto the vocabulary (same result, cheaper).
        """

        def run(keep: Tensor, at: Tensor | None = None) -> Tensor:
            b, t = keep.shape
            h = encoder_out.expand(b, -1, -1).clone()
            h[:, :t] = h[:, :t] * keep.unsqueeze(-1).to(h.dtype)
            ids, pos = upto_positions(decoder_ids, positions, at)
            return at_positions(self.decode(h, ids).logits, pos)

        return run

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def generate(
        self,
        utterance: Utterance,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        encoder_out: Tensor | None = None,
    ) -> Tensor:
        """The model's own hypothesis, as a decoder sequence starting with the start token
        (over ``encoder_out`` when given, so the encoder does not run again): :meth:`generate_from` over
        the utterance's encoder output."""
        if encoder_out is None:
            encoder_out = self.encode(utterance.features.unsqueeze(0).to(self.device, self.dtype))
        return self.generate_from(encoder_out, num_beams, max_new_tokens)

    def generate_from(self, encoder_out: Tensor, num_beams: int, max_new_tokens: int | None) -> Tensor:
        """The hypothesis over the encoder output ``[1, T', D]`` of one utterance, prompt included (on the
        CPU); called by :meth:`generate`, under ``torch.no_grad()``. The default is greedy (``num_beams=1``) or
        beam search with :meth:`decode` (:func:`~xattn_lightning.adapters.decoding.generic_generate`);
        adapters whose model has a decoding routine of its own override this."""
        return generic_generate(self, encoder_out, num_beams=num_beams, max_new_tokens=max_new_tokens)

    def prompt_ids(self) -> list[int]:
        """Tokens that begin every decoder sequence (at least the decoder start token)."""
        return [self.info.decoder_start_id]

    def normalize_target(self, ids: Tensor | Sequence[int]) -> Tensor:
        """Make a decoder sequence from target ids: drop padding (``-100``/pad after EOS) and
        prepend the decoder start/prompt when the ids lack it (HF ``labels`` convention)."""
        t = torch.as_tensor(ids).reshape(-1).long().cpu()
        t = t[t >= 0]
        info = self.info
        if t.numel() and (t == info.eos_id).any():
            first_eos = int((t == info.eos_id).nonzero()[0])
            # keep the EOS only if something precedes it (EOS may double as the start token)
            if first_eos == 0 and info.decoder_start_id == info.eos_id:
                rest = t[1:]
                if (rest == info.eos_id).any():
                    first_eos = 1 + int((rest == info.eos_id).nonzero()[0])
            t = t[: first_eos + 1]
        if t.numel() == 0 or int(t[0]) != info.decoder_start_id:
            t = torch.cat([torch.tensor([info.decoder_start_id]), t])
        return t

    def default_tokenizer(self) -> object | None:
        """A tokenizer the model itself can provide without downloads (``None`` by default)."""
        return None

    def with_prompt(self, t: Tensor) -> Tensor:
        """``t`` (starting with the decoder start token) with the forced prompt after the start token
        when it lacks it (e.g. labels of an English-only Whisper without ``<|notimestamps|>``)."""
        prompt = self.prompt_ids()
        if len(prompt) > 1 and t[1 : len(prompt)].tolist() != prompt[1:] and not self.special_mask(t[1:2]).all():
            t = torch.cat([torch.tensor(prompt), t[1:]])
        return t

    def suppress(self, logp: Tensor, step: int) -> Tensor:
        """Log-probabilities ``[B, V]`` of the next token at generation ``step`` with the tokens the
        model must never generate set to ``-inf`` (none by default)."""
        return logp

    def special_mask(self, ids: Tensor) -> Tensor:
        """True where a predicted token is special (EOS, start, language/task/timestamp)."""
        special = torch.tensor(sorted(self.info.special_ids | {self.info.eos_id, self.info.decoder_start_id}))
        return torch.isin(ids.cpu(), special)

    def token_strings(self, ids: Tensor) -> list[str] | None:
        """Token strings for ``ids`` when a tokenizer is known."""
        tok = self.tokenizer
        if tok is None:
            return None
        tok = unwrap_tokenizer(tok)
        if hasattr(tok, "convert_ids_to_tokens"):
            out = tok.convert_ids_to_tokens([int(i) for i in ids])
            return [str(s).replace("\u0120", " ").replace("\u2581", " ") for s in out]
        if callable(tok):
            return [str(tok(int(i))) for i in ids]
        return None

    def decode_text(self, ids: Tensor) -> str | None:
        """Text for ``ids`` (special tokens skipped) when a tokenizer is known."""
        tok = self.tokenizer
        if tok is None:
            return None
        tok = unwrap_tokenizer(tok)
        keep = ids[~self.special_mask(ids)]
        if hasattr(tok, "decode"):
            return str(tok.decode([int(i) for i in keep], skip_special_tokens=True)).strip()
        strings = self.token_strings(keep)
        return "".join(strings).strip() if strings is not None else None

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def capture_context(self) -> Iterator[None]:
        """Put the model in the state explanation needs and restore it afterwards.

        Eval mode (no dropout) is set; the previous train/eval mode of every submodule is
        restored on exit, also when the body raises. ``requires_grad`` flags are never changed.
        """
        modes = [(m, m.training) for m in self.model.modules()]
        hooks = _hook_snapshot(self.model)
        try:
            self.model.eval()
            yield
        finally:
            for m, was_training in modes:
                m.training = was_training
            _restore_hooks(self.model, hooks)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
#: flags libraries set when they install hooks lazily (transformers 5's output-capturing hooks)
_HOOK_FLAGS = ("_output_capturing_hooks_installed",)


def _hook_snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, set], dict[str, bool]]]:
    snap = []
    for m in model.modules():
        keys = {name: set(getattr(m, name, {}) or {}) for name in _HOOK_DICTS}
        flags = {f: f in m.__dict__ for f in _HOOK_FLAGS}
        snap.append((m, keys, flags))
    return snap


def _restore_hooks(model: nn.Module, snap: list) -> None:
    """Remove every hook added to ``model`` since ``snap`` (ours, or installed lazily by a library
    during the call), so no hook survives an explanation."""
    for m, keys, flags in snap:
        for name, before in keys.items():
            d = getattr(m, name, None)
            if d:
                for k in [k for k in d if k not in before]:
                    del d[k]
        for f, had in flags.items():
            if not had and f in m.__dict__:
                del m.__dict__[f]


def check_target_length(adapter: Adapter, seq: Tensor) -> None:
    """Raise if a decoder sequence is empty or longer than the decoder's positions allow."""
    n_pred = seq.numel() - 1
    if n_pred < 1:
        raise XAttnError("The target is empty: give at least one token to explain.")
    limit = adapter.info.max_target_positions
    if limit is not None and seq.numel() - 1 > limit:
        raise XAttnError(
            f"The target has {seq.numel() - 1} decoder positions but the decoder allows at most {limit}; "
            "shorten or split the utterance."
        )


def at_positions(x: Tensor, pos: Tensor | None) -> Tensor:
    """``x [B, S, ...]`` at decoder positions ``pos``: ``[P]`` the same for every row, ``[B, P]`` each row its own
    (a masked-decoder call's ``at``); ``None``: ``x`` itself.

    >>> x = torch.arange(6).view(2, 3)
    >>> at_positions(x, torch.tensor([2])).tolist(), at_positions(x, torch.tensor([[0], [2]])).tolist()
    ([[2], [5]], [[0], [5]])
    """
    if pos is None:
        return x
    if pos.dim() == 2:
        return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), pos.to(x.device)]
    return x[:, pos]


def upto_positions(decoder_ids: Tensor, positions: Tensor | None, at: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The decoder ids a masked-decoder call needs and the positions it returns: with ``at``, the ids up to its
    last position and ``at``; else all ids and ``positions``."""
    if at is None:
        return decoder_ids, positions
    return decoder_ids[..., : int(at.max()) + 1], at
