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
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xattn_lightning.adapters import Adapter, adapter_for
from xattn_lightning.audio import load_audio, resample
from xattn_lightning.errors import XAttnError
from xattn_lightning.functional.alignment import Word
from xattn_lightning.functional.silence import quiet_cuts
from xattn_lightning.loading import audio_window, check_audio_length, features_from_audio, tokenize_labels
from xattn_lightning.timestamps.align import HeadRule
from xattn_lightning.timestamps.choice import CHOICE_UTTERANCES, cached_heads, choosing_encoder_cache, heads_report
from xattn_lightning.timestamps.words import word_timestamps

#: a piece whose peak stays below this (linear, -60 dBFS) holds no speech and gets no words (Whisper transcribes
#: silence as some word: "you" on tiny.en)
SILENT_PEAK = 1e-3

#: while the model's head set is being chosen, pieces last at most this long (s): the choice was validated on
#: utterances of 3-10 s, and on a 30-s piece it occludes up to 64 words behind long decoder prefixes (about 20 s of
#: choice per piece on tiny.en); timed in 10-s pieces the error is no worse (docs/timestamps.md, "Long audio")
CHOICE_PIECE_SECONDS = 10.0

#: what :func:`audio_word_timestamps` takes per input: a file path, or a mono waveform (1-D) at its sampling rate
AudioInput = str | Path | Tensor | np.ndarray

_log = logging.getLogger("xattn_lightning")


@dataclass
class AudioWords:
    """The words of one audio input, from :func:`audio_word_timestamps`.

    ``words``: ``(word, start_s, end_s)`` from the start of the audio; ``seconds``: its length; ``pieces``: the
    ``(start_s, end_s)`` stretches timed one by one (one piece within the model's window); ``silent``: the pieces
    given no words, their peak below :data:`SILENT_PEAK`. Times are rounded to the microsecond; a word DTW gives no
    frame of its own starts where it ends. ``dataclasses.asdict`` gives plain lists and floats (JSON).
    """

    words: list[Word]
    seconds: float
    pieces: list[tuple[float, float]] = field(default_factory=list)
    silent: list[tuple[float, float]] = field(default_factory=list)


def _waveform(x: AudioInput, rate: int, model_rate: int, name: str) -> Tensor:
    """The input as a float waveform at ``model_rate``: a file read and resampled, or an array at ``rate``
    (integer samples scaled to [-1, 1], as soundfile reads them) resampled."""
    if isinstance(x, (str, Path)):
        if not Path(x).is_file():
            what = "is a directory" if Path(x).is_dir() else "does not exist"
            raise XAttnError(f"Audio {name} {what}; pass an audio file (WAV, FLAC, OGG) or a waveform.")
        wav = load_audio(x, model_rate)
    else:
        arr = x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        if arr.dim() != 1:
            raise XAttnError(
                f"Audio {name} has shape {tuple(arr.shape)}; pass a mono waveform (1-D, at sampling_rate), "
                f"e.g. wav.mean(0) for channels first."
            )
        if arr.dtype == torch.uint8:  # 8-bit PCM is unsigned, centred on 128
            wav = (arr.float() - 128) / 128
        elif not arr.is_floating_point():  # 16/32-bit PCM (scipy.io.wavfile, soundfile dtype="int16")
            if arr.dtype not in (torch.int16, torch.int32):  # int64 says nothing of the PCM width
                raise XAttnError(
                    f"Audio {name} has samples of {arr.dtype}; pass float samples in [-1, 1], or 16- or 32-bit PCM "
                    f"as int16 or int32 (e.g. np.asarray(samples, dtype=np.int16))."
                )
            bits = {torch.int16: 16, torch.int32: 32}[arr.dtype]
            wav = arr.double().div(2 ** (bits - 1)).float()
        else:
            wav = arr.float()
        if not bool(torch.isfinite(wav).all()):
            raise XAttnError(f"Audio {name} holds NaN or infinite samples.")
        wav = resample(wav, rate, model_rate)
    return check_audio_length(wav, model_rate, name)


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
    :data:`~xattn_lightning.timestamps.choice.CHOICE_UTTERANCES` pieces (of at most :data:`CHOICE_PIECE_SECONDS`)
    are timed together, so that every piece is timed with the one set chosen on them (kept on disk for the next
    runs; :func:`~xattn_lightning.timestamps.choice.heads_report` says which, also logged at INFO on the
    ``xattn_lightning`` logger; to choose beforehand on other speech:
    :func:`~xattn_lightning.timestamps.choice.choose_heads`).

    Args:
        model: a supported model or adapter (a Hugging Face Whisper: the model's window comes from ``processor``).
        audio: audio files (any rate, mixed to mono) or mono waveforms at ``sampling_rate`` (float in [-1, 1], or
            integer PCM, scaled); both resampled to the processor's rate (Whisper: 16 kHz).
        processor: the model's processor or feature extractor (makes the model inputs; a processor's tokenizer
            names the tokens unless ``tokenizer`` is given). An openai-whisper model takes transformers'
            ``WhisperFeatureExtractor`` (the same log-mel features) and its own tokenizer.
        tokenizer: the tokenizer, when ``processor`` is only a feature extractor.
        sampling_rate: the rate of the waveforms given as arrays (files carry their own).
        texts: one transcript per input to time instead of the model's own (forced alignment); each input must
            then fit the window (a text cannot be split between pieces without timing it).
        names: one name per input for error messages (default: its path or index).
        heads: as :func:`~xattn_lightning.timestamps.words.word_timestamps` (default: the model's chosen set).
        max_seconds: the longest piece (default: the model's window; required when ``processor`` takes any
            length and the audio should still be cut).
        progress: a progress bar over the pieces (on stderr), naming the head set used.
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
    if isinstance(texts, str):
        texts = [texts]
    n = len(audio)
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate <= 0:
        raise XAttnError(f"sampling_rate must be a positive whole number of samples per second, got {sampling_rate!r}.")
    if texts is not None and len(texts) != n:
        raise XAttnError(f"{n} audio inputs but {len(texts)} texts: pass one text per input.")
    if texts is not None and any(not str(t).strip() for t in texts):
        raise XAttnError("texts holds an empty transcript: forced alignment needs the words of each input.")
    if names is not None and len(names) != n:
        raise XAttnError(f"{n} audio inputs but {len(names)} names: pass one name per input.")
    labels = [str(v) for v in names] if names is not None else [
        repr(str(x)) if isinstance(x, (str, Path)) else f"#{i}" for i, x in enumerate(audio)
    ]
    fe = getattr(processor, "feature_extractor", processor)
    model_rate = int(getattr(fe, "sampling_rate", None) or 16000)
    window = max_seconds if max_seconds is not None else audio_window(processor, model_rate)
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
    auto = heads in (None, "auto")
    choosing = auto and choosing_encoder_cache(adapter) is not None
    kept = cached_heads(adapter) if auto and not choosing else None  # read back (or chosen earlier in the process)
    pieces: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    silent: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    seconds = [0.0] * n
    bar = tqdm(total=n, desc="word timestamps", unit="piece", disable=not progress)
    timed = [0]  # pieces handed out so far

    def cuts_of(wav: Tensor) -> list[tuple[int, int]]:
        if window is None:
            return [(0, wav.numel())]
        short = CHOICE_UTTERANCES - timed[0] if choosing and window > CHOICE_PIECE_SECONDS else 0
        if short <= 0:
            return quiet_cuts(wav, model_rate, window)
        first = quiet_cuts(wav, model_rate, CHOICE_PIECE_SECONDS)[:short]  # the choosing pieces: short ones
        start = first[-1][1]
        rest = [(a + start, b + start) for a, b in quiet_cuts(wav[start:], model_rate, window)] if start < wav.numel() else []
        return first + rest

    def stream() -> Iterator[tuple[int, float, Tensor]]:  # (input, offset s, piece), lazily
        for i, x in enumerate(audio):
            wav = _waveform(x, sampling_rate, model_rate, labels[i])
            seconds[i] = wav.numel() / model_rate
            cuts = cuts_of(wav)
            if texts is not None and len(cuts) > 1:
                raise XAttnError(
                    f"Audio {labels[i]} is {seconds[i]:.1f} s, longer than the model's {window:.0f}-s window: a text "
                    f"cannot be split between pieces; cut the audio and its text into utterances."
                )
            bar.total += len(cuts) - 1
            bar.refresh()
            for a, b in cuts:
                span = (a / model_rate, b / model_rate)
                pieces[i].append(span)
                if float(wav[a:b].abs().max()) < SILENT_PEAK:  # nothing to time: the model would invent words
                    silent[i].append(span)
                    bar.update(1)
                    continue
                timed[0] += 1
                yield i, span[0], wav[a:b]

    words: list[list[Word]] = [[] for _ in range(n)]
    size = CHOICE_UTTERANCES if choosing else 1  # the choosing pieces together: one choice, used for all
    chunks = stream()
    with bar:
        while chunk := list(itertools.islice(chunks, size)):
            size = 1
            batch = features_from_audio(processor, [w for _, _, w in chunk], model_rate)
            targets: Any = "generate"
            if texts is not None:
                batch["labels"] = tokenize_labels(adapter.tokenizer, [texts[i] for i, *_ in chunk])
                targets = "labels"
            got = word_timestamps(adapter, batch, heads=heads, targets=targets, **options)
            for (i, offset, _), ws in zip(chunk, got):
                words[i] += [(w, round(a + offset, 6), round(b + offset, 6)) for w, a, b in ws]
            bar.update(len(chunk))
        report = heads_report(adapter, read_back=kept is not None) if auto else None
        if report is not None:
            _log.info(report)
            bar.set_postfix_str(report.split(";")[0].removeprefix("head set: "))
    return [AudioWords(words[i], seconds[i], pieces[i], silent[i]) for i in range(n)]
