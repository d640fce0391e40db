"""``xl.audio_word_timestamps``: word times of audio of any length, from files or waveforms.

Whisper reads a fixed window (30 s); :func:`~xattn_lightning.timestamps.words.word_timestamps` times what a model
batch holds, and a batch cut to the window loses the rest. This cuts longer audio into pieces at quiet points
(:func:`~xattn_lightning.functional.silence.quiet_cuts`), times each piece and shifts its times back, gives no words
to pieces that hold only digital silence (the model would invent some), and times the first pieces together so
that the default's head set is chosen once, on them, and used for all (see
:func:`~xattn_lightning.timestamps.choice.choose_for`). Stands without Lightning.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xattn_lightning.adapters import Adapter, adapter_for
from xattn_lightning.audio import load_audio
from xattn_lightning.errors import XAttnError
from xattn_lightning.functional.alignment import Word
from xattn_lightning.functional.silence import quiet_cuts
from xattn_lightning.loading import audio_window, features_from_audio, tokenize_labels
from xattn_lightning.timestamps.align import HeadRule
from xattn_lightning.timestamps.choice import CHOICE_UTTERANCES, choosing_encoder_cache
from xattn_lightning.timestamps.words import word_timestamps

#: a piece whose peak stays below this (linear, -60 dBFS) holds no speech and gets no words (Whisper transcribes
#: silence as some word: "you" on tiny.en)
SILENT_PEAK = 1e-3

#: what :func:`audio_word_timestamps` takes per input: a file path, or a mono waveform (1-D) at its sampling rate
AudioInput = str | Path | Tensor | np.ndarray


@dataclass(frozen=True)
class AudioWords:
    """The words of one audio input, from :func:`audio_word_timestamps`.

    ``words``: ``(word, start_s, end_s)`` from the start of the audio; ``seconds``: its length; ``pieces``: the
    ``(start_s, end_s)`` stretches timed one by one (one piece within the model's window); ``silent``: the pieces
    given no words, their peak below :data:`SILENT_PEAK`.
    """

    words: list[Word]
    seconds: float
    pieces: list[tuple[float, float]] = field(default_factory=list)
    silent: list[tuple[float, float]] = field(default_factory=list)


def _waveform(x: AudioInput, sampling_rate: int, name: str) -> Tensor:
    if isinstance(x, (str, Path)):
        if not Path(x).is_file():
            raise XAttnError(f"Audio file {str(x)!r} ({name}) does not exist.")
        wav = load_audio(x, sampling_rate)
    else:
        wav = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().float().cpu()
        if wav.dim() != 1:
            raise XAttnError(
                f"Audio {name} has shape {tuple(wav.shape)}; pass a mono waveform (1-D, at sampling_rate), "
                f"e.g. wav.mean(0) for channels first."
            )
        if not bool(torch.isfinite(wav).all()):
            raise XAttnError(f"Audio {name} holds NaN or infinite samples.")
    if wav.numel() < sampling_rate // 40:
        raise XAttnError(f"Audio {name} is shorter than 25 ms ({wav.numel()} samples); leave it out.")
    return wav


def audio_word_timestamps(
    model: nn.Module | Adapter,
    audio: Sequence[AudioInput],
    *,
    processor: Any,
    tokenizer: object | None = None,
    sampling_rate: int = 16000,
    texts: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    heads: Sequence[Sequence[int]] | HeadRule | None = None,
    max_seconds: float | None = None,
    progress: bool = False,
    **options: Any,
) -> list[AudioWords]:
    """Word times of each audio input (a file or a 1-D waveform at ``sampling_rate``), of any length: audio longer
    than the model's window (``processor``'s, e.g. Whisper's 30 s; or ``max_seconds``) is cut at its quietest
    points into pieces, each timed by :func:`~xattn_lightning.timestamps.words.word_timestamps` (the model's own
    transcript, or ``texts``) and its times shifted back. Pieces whose peak stays below :data:`SILENT_PEAK` get no
    words. While the default's head set is still to be chosen, the first
    :data:`~xattn_lightning.timestamps.choice.CHOICE_UTTERANCES` pieces are timed together, so that every piece is
    timed with the one set chosen on them (kept on disk for the next runs).

    Args:
        model: a supported model or adapter (a Hugging Face Whisper: the model's window comes from ``processor``).
        audio: audio files (read and resampled to ``sampling_rate``) or mono waveforms at ``sampling_rate``.
        processor: the model's processor or feature extractor (makes the model inputs; a processor's tokenizer
            names the tokens unless ``tokenizer`` is given). An openai-whisper model takes transformers'
            ``WhisperFeatureExtractor`` (the same log-mel features) and its own tokenizer.
        tokenizer: the tokenizer, when ``processor`` is only a feature extractor.
        sampling_rate: the waveforms' rate, and the rate files are resampled to (the processor's).
        texts: one transcript per input to time instead of the model's own (forced alignment); each input must
            then fit the window (a text cannot be split between pieces without timing it).
        names: one name per input for error messages (default: its path or index).
        heads: as :func:`~xattn_lightning.timestamps.words.word_timestamps` (default: the model's chosen set).
        max_seconds: the longest piece (default: the model's window; required when ``processor`` takes any
            length and the audio should still be cut).
        progress: a progress bar over the inputs (on stderr).
        **options: passed to :func:`~xattn_lightning.timestamps.words.word_timestamps` (``duration_prior``,
            ``silence``, ``method``, ...).

    Example (a real Whisper and its processor)::

        out = xl.audio_word_timestamps(model, ["talk.wav"], processor=processor)
        out[0].words[:2]  # [('Good', 0.0, 0.3), ('morning', 0.3, 0.78)]; over the whole file, past 30 s
        out[0].pieces     # [(0.0, 28.6), (28.6, 47.1)]: cut in a pause
    """
    from tqdm.auto import tqdm

    if isinstance(audio, (str, Path, Tensor, np.ndarray)):
        audio = [audio]  # one input, not a sequence of samples or characters
    n = len(audio)
    if texts is not None and len(texts) != n:
        raise XAttnError(f"{n} audio inputs but {len(texts)} texts: pass one text per input.")
    if texts is not None and any(not str(t).strip() for t in texts):
        raise XAttnError("texts holds an empty transcript: forced alignment needs the words of each input.")
    if names is not None and len(names) != n:
        raise XAttnError(f"{n} audio inputs but {len(names)} names: pass one name per input.")
    labels = names if names is not None else [repr(str(x)) if isinstance(x, (str, Path)) else f"#{i}" for i, x in enumerate(audio)]
    window = max_seconds if max_seconds is not None else audio_window(processor, sampling_rate)
    if window is not None and window <= 0:
        raise XAttnError(f"max_seconds must be positive, got {window}.")
    if tokenizer is None and (hasattr(processor, "tokenizer") or hasattr(processor, "decode")):
        tokenizer = processor  # a processor with its tokenizer (a bare feature extractor names no tokens)
    adapter = adapter_for(model, tokenizer)
    if texts is not None and not callable(getattr(adapter.tokenizer, "tokenizer", adapter.tokenizer)):
        raise XAttnError(
            f"texts= tokenizes the texts with a Hugging Face tokenizer, and {type(adapter.tokenizer).__name__} is "
            f"not one: pass tokenizer= (e.g. transformers' WhisperTokenizer of the model), or time the model's own "
            f"transcript (texts=None)."
        )
    pieces: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    silent: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    seconds = [0.0] * n
    bar = tqdm(total=n, desc="word timestamps", unit="input", disable=not progress)

    def stream() -> Iterator[tuple[int, float, Tensor, bool]]:  # (input, offset s, piece, its last?), lazily
        for i, x in enumerate(audio):
            wav = _waveform(x, sampling_rate, str(labels[i]))
            seconds[i] = wav.numel() / sampling_rate
            cuts = quiet_cuts(wav, sampling_rate, window) if window is not None else [(0, wav.numel())]
            if texts is not None and len(cuts) > 1:
                raise XAttnError(
                    f"Audio {labels[i]} is {seconds[i]:.1f} s, longer than the model's {window:.0f}-s window: a text "
                    f"cannot be split between pieces; cut the audio and its text into utterances."
                )
            for k, (a, b) in enumerate(cuts):
                span = (a / sampling_rate, b / sampling_rate)
                pieces[i].append(span)
                last = k == len(cuts) - 1
                if float(wav[a:b].abs().max()) < SILENT_PEAK:  # nothing to time: the model would invent words
                    silent[i].append(span)
                    bar.update(last)
                    continue
                yield i, span[0], wav[a:b], last

    words: list[list[Word]] = [[] for _ in range(n)]
    choosing = heads in (None, "auto") and choosing_encoder_cache(adapter) is not None
    size = CHOICE_UTTERANCES if choosing else 1  # the choosing pieces together: one choice, used for all
    chunks = stream()
    with bar:
        while chunk := list(itertools.islice(chunks, size)):
            size = 1
            batch = features_from_audio(processor, [w for _, _, w, _ in chunk], sampling_rate)
            targets: Any = "generate"
            if texts is not None:
                batch["labels"] = tokenize_labels(adapter.tokenizer, [texts[i] for i, *_ in chunk])
                targets = "labels"
            got = word_timestamps(adapter, batch, heads=heads, targets=targets, **options)
            for (i, offset, _, _), ws in zip(chunk, got):
                words[i] += [(w, a + offset, b + offset) for w, a, b in ws]
            bar.update(sum(last for *_, last in chunk))
    return [AudioWords(words[i], seconds[i], pieces[i], silent[i]) for i in range(n)]
