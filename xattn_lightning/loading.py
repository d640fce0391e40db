"""Loading Hugging Face S2T checkpoints and turning manifests into model batches.

Used by the CLI, the examples and the benchmarks; ``xl.explain`` itself never loads anything.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from xattn_lightning.adapters.base import unwrap_tokenizer
from xattn_lightning.audio import ManifestRow, load_audio
from xattn_lightning.errors import UnsupportedModelError, XAttnError, first_line


def load_hf_model(name_or_path: str, device: str = "cpu", base_model: str | None = None) -> tuple[Any, Any]:
    """Load a Hugging Face Whisper or Speech2Text checkpoint and its processor.

    ``name_or_path`` is a hub id (``openai/whisper-tiny.en``) or a local directory. A PEFT adapter
    directory (``adapter_config.json``, as ``peft_model.save_pretrained`` writes it: LoRA weights
    only) is loaded onto its base model (``base_model``, or the one its config names) and merged
    into it. Raises :class:`~xattn_lightning.errors.XAttnError` with one clear line when it is
    missing or not a speech-to-text encoder-decoder.

    >>> load_hf_model("/no/such/dir")
    Traceback (most recent call last):
    ...
    xattn_lightning.errors.XAttnError: Model directory '/no/such/dir' does not exist.
    """
    import transformers

    local = Path(name_or_path)
    if local.is_dir() and (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        return _load_peft_adapter(local, device, base_model)
    if local.exists() and not local.is_dir():
        raise XAttnError(
            f"{name_or_path!r} is a file, not a Hugging Face model directory; "
            "Lightning .ckpt files need --module package.module:Class."
        )
    if not local.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise XAttnError(f"Model directory {name_or_path!r} does not exist.")
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except Exception as err:  # hub unreachable, no config.json, ...
        hint = " (offline: set HF_HUB_OFFLINE=0 or pass a local directory)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise XAttnError(f"Cannot load a model config from {name_or_path!r}{hint}: {first_line(err)}") from err
    model_cls: Any
    proc_cls: Any
    if config.model_type == "whisper":
        model_cls, proc_cls = transformers.WhisperForConditionalGeneration, transformers.WhisperProcessor
    elif config.model_type == "speech_to_text":
        model_cls, proc_cls = transformers.Speech2TextForConditionalGeneration, transformers.Speech2TextProcessor
    else:
        raise UnsupportedModelError(
            f"{name_or_path!r} is a {config.model_type!r} model, not a speech-to-text encoder-decoder "
            "(supported: whisper, speech_to_text; custom models through xl.HookAdapter)."
        )
    try:
        model = model_cls.from_pretrained(name_or_path).to(device).eval()
        processor = proc_cls.from_pretrained(name_or_path)
    except Exception as err:
        raise XAttnError(f"Cannot load {name_or_path!r}: {first_line(err)}") from err
    return model, processor


def _load_peft_adapter(path: Path, device: str, base_model: str | None) -> tuple[Any, Any]:
    """A PEFT adapter directory, loaded onto its base model and merged (explanations then run on an
    ordinary model, with the same maps as through the LoRA layers)."""
    try:
        import peft
    except ImportError as err:
        raise XAttnError(
            f"{str(path)!r} is a PEFT adapter directory (adapter_config.json); install peft to load it "
            "(pip install peft), or pass a merged model directory."
        ) from err
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise XAttnError(f"Cannot read {str(path / 'adapter_config.json')!r}: {first_line(err)}") from err
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise XAttnError(f"{str(path)!r} does not name its base model; pass base_model= (--base-model).")
    model, processor = load_hf_model(base, device)
    try:
        model = peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload().to(device).eval()
    except Exception as err:
        raise XAttnError(f"Cannot apply the adapter {str(path)!r} to {base!r}: {first_line(err)}") from err
    if (path / "preprocessor_config.json").is_file():  # the processor saved beside the adapter, if any
        processor = type(processor).from_pretrained(str(path))
    return model, processor


def features_batch(processor: Any, rows: Sequence[ManifestRow], sampling_rate: int = 16000) -> dict:
    """Model inputs (``input_features``, ``attention_mask``) for manifest rows, through the model's processor;
    ``words`` (true word timings per utterance) too when every row has them."""
    wavs = [load_row_audio(r, sampling_rate) for r in rows]
    window = audio_window(processor, sampling_rate)
    for r, wav in zip(rows, wavs):
        if window is not None and wav.numel() > window * sampling_rate:
            warnings.warn(
                f"Audio {str(r.audio)!r} of utterance {r.id!r} is {wav.numel() / sampling_rate:.1f} s; the model reads "
                f"{window:.0f} s and the rest is cut off. For word timestamps, xl.audio_word_timestamps (and "
                f"`xattn-lightning timestamps`) time audio of any length; else split it.",
                stacklevel=2,
            )
    out = features_from_audio(processor, wavs, sampling_rate)
    if rows and all(r.words is not None for r in rows):
        out["words"] = [r.words for r in rows]
    return out


def load_row_audio(row: ManifestRow, sampling_rate: int = 16000) -> Tensor:
    """A manifest row's waveform at ``sampling_rate`` (:func:`~xattn_lightning.audio.load_audio`), refused when
    shorter than 25 ms (:func:`check_audio_length`)."""
    return check_audio_length(load_audio(row.audio, sampling_rate), sampling_rate, f"{str(row.audio)!r} of utterance {row.id!r}")


def check_audio_length(wav: Tensor, sampling_rate: int, what: str) -> Tensor:
    """``wav``, refused with :class:`~xattn_lightning.errors.XAttnError` when shorter than 25 ms (nothing a model
    can read); ``what`` names it in the message.

    >>> import torch
    >>> check_audio_length(torch.zeros(400), 16000, "'a.wav'").numel()
    400
    """
    if wav.numel() < sampling_rate // 40:
        raise XAttnError(f"Audio {what} is shorter than 25 ms ({wav.numel()} samples); leave it out.")
    return wav


def audio_window(processor: Any, sampling_rate: int = 16000) -> float | None:
    """Seconds of audio the processor's feature extractor reads at most (Whisper: 30), ``None`` when it takes any
    length.

    >>> audio_window(object()) is None
    True
    """
    fe = getattr(processor, "feature_extractor", processor)
    n = getattr(fe, "n_samples", None)
    rate = getattr(fe, "sampling_rate", sampling_rate)
    return float(n) / rate if n else None


def features_from_audio(processor: Any, wavs: Sequence[Tensor], sampling_rate: int = 16000) -> dict:
    """Model inputs (``input_features``, ``attention_mask``) for 1-D waveforms at ``sampling_rate``, through the
    model's processor (a fixed-window extractor such as Whisper's pads and cuts to its window; others pad to the
    longest)."""
    fe = getattr(processor, "feature_extractor", processor)
    padding = {} if getattr(fe, "n_samples", None) else {"padding": True}
    arrays = [w.numpy() if isinstance(w, Tensor) else w for w in wavs]
    return dict(fe(arrays, sampling_rate=sampling_rate, return_tensors="pt", return_attention_mask=True, **padding))


def tokenize_labels(processor: Any, texts: Sequence[str]):
    """Reference token ids padded with -100 (the Hugging Face label convention)."""
    tok = unwrap_tokenizer(processor)
    enc = tok(list(texts), return_tensors="pt", padding=True)
    ids = enc.input_ids
    return ids.masked_fill(enc.attention_mask == 0, -100)
