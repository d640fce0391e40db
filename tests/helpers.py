"""What the tests share: tiny models built from config (no downloads), an oracle encoder-decoder with known
saliency, a CPU trainer, manifests of synthetic audio, and the examples loaded as modules."""

from __future__ import annotations

import csv
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import soundfile as sf
import torch
from torch import Tensor, nn

from xattn_lightning.audio import load_audio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def tiny_whisper(multilingual: bool = False, attn: str | None = None, seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    vocab = 120 if multilingual else 80
    start, eos = (101, 100) if multilingual else (51, 50)
    cfg = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=16,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_source_positions=100,
        max_target_positions=24,
        decoder_start_token_id=start,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=eos,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    kw = {"attn_implementation": attn} if attn else {}
    model = (
        WhisperForConditionalGeneration(cfg, **kw)
        if not kw
        else WhisperForConditionalGeneration._from_config(cfg, **kw)
    )
    gen = model.generation_config
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id = start, eos, eos
    gen.forced_decoder_ids = None
    gen.max_length = 20
    if multilingual:
        gen.is_multilingual = True
        gen.lang_to_id = {"<|en|>": 102, "<|it|>": 103}
        gen.task_to_id = {"transcribe": 104, "translate": 105}
        gen.no_timestamps_token_id = 106
    else:
        gen.no_timestamps_token_id = 52
    return model.eval()


def tiny_speech2text(seed: int = 0):
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Speech2TextConfig(
        vocab_size=40,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        conv_channels=16,
        input_feat_per_channel=12,
        max_source_positions=200,
        max_target_positions=20,
    )
    model = Speech2TextForConditionalGeneration(cfg).eval()
    model.generation_config.max_length = 12
    return model


def whisper_batch(model, lengths=(37, 60), seed: int = 0) -> dict:
    """A batch like WhisperProcessor's: features padded to the window, attention mask of valid frames."""
    g = torch.Generator().manual_seed(seed)
    n_mel, window = model.config.num_mel_bins, model.config.max_source_positions * 2
    feats = torch.full((len(lengths), n_mel, window), -0.5)
    mask = torch.zeros(len(lengths), window, dtype=torch.long)
    for b, n in enumerate(lengths):
        feats[b, :, :n] = torch.randn(n_mel, n, generator=g)
        mask[b, :n] = 1
    return {"input_features": feats, "attention_mask": mask}


class PoolEncoder(nn.Module):
    """H[t'] = mean of input frames 2t', 2t'+1 (no context mixing)."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, f = x.shape
        x = nn.functional.pad(x, (0, 0, 0, t % 2))
        return x.reshape(b, -1, 2, f).mean(2)


class OracleAttention(nn.Module):
    """Decoder position j attends uniformly to encoder frames ``regions[j]`` and nothing else."""

    def __init__(self, regions: list[range]) -> None:
        super().__init__()
        self.regions = regions

    def forward(self, num_queries: int, h: Tensor) -> tuple[Tensor, Tensor]:
        w = torch.zeros(num_queries, h.shape[1], dtype=h.dtype)
        for j in range(num_queries):
            r = self.regions[min(j, len(self.regions) - 1)]
            w[j, r.start : r.stop] = 1.0 / len(r)
        return torch.einsum("st,btd->bsd", w, h), w.expand(h.shape[0], 1, -1, -1)


class Oracle(nn.Module):
    """Token j's distribution depends only on input frames 2*regions[j] (known saliency)."""

    def __init__(self, regions: list[range], num_bins: int = 4, vocab: int = 10, scale: float = 4.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = PoolEncoder()
        self.xattn = OracleAttention(regions)
        self.proj = nn.Linear(num_bins, vocab)
        self.scale = scale

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        h = self.encoder(x)
        out, _ = self.xattn(ids.shape[1], h)
        return self.proj(out) * self.scale


def oracle_adapter(model: Oracle):
    import xattn_lightning as xl

    return xl.HookAdapter(
        model,
        encoder="encoder",
        cross_attention="xattn",
        decoder_start_id=1,
        eos_id=2,
        frames_per_step=2,
        num_heads=1,
    )


def speaking_tiny_whisper(seed: int = 0):
    """A tiny random Whisper that generates ordinary (non-special) tokens."""
    m = tiny_whisper(seed=seed)
    with torch.no_grad():
        m.model.decoder.embed_tokens.weight[50:] *= 0.01  # tied output projection: specials unlikely
    return m


def tiny_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=16, chunk_length=2, sampling_rate=16000)  # the tiny model's 2-s window


def lora_model(model, target_modules=("q_proj", "v_proj"), scale: float = 0.5, seed: int = 0):
    """``model`` wrapped by peft's ``get_peft_model`` (rank 4) with non-zero LoRA ``B`` weights, so
    that the adapters change the model (LoRA starts as the identity). Skips without peft."""
    import pytest

    peft = pytest.importorskip("peft", reason="peft is in the dev extras")
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), lora_dropout=0.0)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return pm


def tuple_data(n: int = 8, seed: int = 0):
    """A ``TensorDataset`` of (features [16 mel, 200 frames], labels) pairs, as a script's own Dataset would give them."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.full((n, 16, 200), -0.5)
    feats[:, :, :120] = torch.randn(n, 16, 120, generator=g)
    labels = torch.randint(3, 40, (n, 5), generator=g)
    labels[:, -1] = 50  # EOS
    from torch.utils.data import TensorDataset

    return TensorDataset(feats, labels)


try:
    import lightning.pytorch as _pl

    class TinyWhisperModule(_pl.LightningModule):
        """A LightningModule around a tiny Whisper with a ``processor`` (for .ckpt loading tests)."""

        def __init__(self, seed: int = 0) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = speaking_tiny_whisper(seed)
            self.processor = tiny_extractor()

        def training_step(self, batch, batch_idx):
            return self.model(input_features=batch[0], labels=batch[1]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

except ImportError:  # pragma: no cover
    pass


def load_example(name: str, lightning: str = "lightning.pytorch"):
    """The example as a module; ``lightning="pytorch_lightning"``: as the same script written with
    ``import pytorch_lightning as pl`` (the other Lightning package) instead of ``lightning.pytorch``."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}_{lightning.replace('.', '_')}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    source = path.read_text()
    if lightning != "lightning.pytorch":
        line = "import lightning.pytorch as pl\n"
        assert line in source, f"{path.name} does not import {line.strip()!r}"
        source = source.replace(line, f"import {lightning} as pl\n")
    exec(compile(source, str(path), "exec"), mod.__dict__)
    return mod


def tone_manifest(tmp_path: Path, n: int = 6) -> Path:
    """Short tone sequences (one tone per character) and their 'transcripts'."""
    rng = np.random.default_rng(0)
    freqs = {"a": 300.0, "b": 700.0, "c": 1500.0}
    lines = []
    for i in range(n):
        text = "".join(rng.choice(list(freqs), size=3))
        t = np.arange(int(0.15 * 16000)) / 16000
        wav = np.concatenate([0.3 * np.sin(2 * np.pi * freqs[c] * t) for c in text]).astype(np.float32)
        sf.write(tmp_path / f"u{i}.wav", wav, 16000)
        lines.append(f"u{i}\tu{i}.wav\t{text}")
    path = tmp_path / "manifest.tsv"
    path.write_text("id\taudio\ttext\n" + "\n".join(lines) + "\n")
    return path


def noise_manifest(tmp_path: Path, n: int = 3, seconds: float = 0.6) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        wav = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        sf.write(tmp_path / f"a{i}.wav", wav, 16000)
        lines.append(f"utt{i}\ta{i}.wav\thello world")
    path = tmp_path / "m.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def manifest_rows(src: str, rows: slice, out: Path) -> Path:
    """Rows of a shared manifest, with absolute audio paths (the example reads the whole manifest)."""
    lines = Path(src).read_text().splitlines()
    base = Path(src).parent
    body = [line.split("\t") for line in lines[1:]][rows]
    for cols in body:
        cols[1] = str(base / cols[1])
    out.write_text("\n".join(["\t".join(c) for c in [lines[0].split("\t"), *body]]) + "\n")
    return out


def processor_batch(proc, rows):
    """A Hugging Face processor's batch of manifest rows (features and attention mask)."""
    wavs = [load_audio(r.audio).numpy() for r in rows]
    return proc(wavs, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)


def _teardown_group(self, trainer, pl_module, stage):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


for _ns in ("lightning.pytorch", "pytorch_lightning"):  # module-level classes, so that ddp_spawn can pickle them
    try:
        _callback = importlib.import_module(_ns).Callback
    except ImportError:  # pragma: no cover
        continue
    _name = f"CleanExit_{_ns.replace('.', '_')}"
    globals()[_name] = type(_name, (_callback,), {"teardown": _teardown_group, "__module__": __name__})


def clean_exit(pl_namespace=pl):
    """A callback that destroys the process group as each spawned process's fit ends (after everything that uses
    it): under torch 2.14 on CPU, a Gloo group left to the interpreter's exit sometimes aborts that process
    (``terminate called without an active exception``, SIGABRT) after its work, which fails ``ddp_spawn``."""
    return globals()[f"CleanExit_{pl_namespace.__name__.replace('.', '_')}"]()


def cpu_trainer(tmp_path, callbacks, logger=False, devices: int = 1, **kw):
    """A quiet CPU ``lightning.pytorch`` trainer (2 epochs unless told), the tests' common set-up; ``devices=2``:
    two processes (``ddp_spawn``), the distributed tests' set-up."""
    if devices > 1:
        kw.setdefault("strategy", "ddp_spawn")
        callbacks = [*callbacks, clean_exit()]
    return pl.Trainer(
        max_epochs=kw.pop("max_epochs", 2),
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=devices,
        **kw,
    )


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def scored(
    pearson: float,
    method: str = "encoder_spes",
    reliability: float | None = None,
    noise: float | None = None,
    n_masks: int | None = None,
    pid: str = "",
    position: int = 0,
    layers: list[float] | None = None,
    grid: list[list[float]] | None = None,
    spearman: float | None = None,
):
    """A probe's typed scores with one method, for summaries without a model (the corrected ρ from
    ``reliability`` when given)."""
    from xattn_lightning.scores import MethodScores, ProbeScores

    s = MethodScores(
        agreement={"pearson": pearson, "spearman": pearson if spearman is None else spearman},
        layers=layers if layers is not None else [pearson],
        grid=grid if grid is not None else [[pearson]],
        coverage=0.5,
        n_masks=n_masks,
        reliability=reliability,
        pearson_corrected=None if reliability is None else pearson / reliability**0.5,
        mask_noise=noise,
    )
    return ProbeScores(pid, "", "", 1, 4, {method: s}, position)


#: seconds: past it a 2-process run is killed and its test fails (a hang is a failure, never a CI stall)
HANG = 240


def side_by_side(fns: list[Callable[[], object]], timeout: float) -> list:
    """Call each of ``fns`` in its own thread, as processes of one job would run; each one's result or the exception
    it raised (each process's outcome is what a test checks), in order."""
    out: list = [None] * len(fns)

    def call(i: int) -> None:
        try:
            out[i] = fns[i]()
        except Exception as err:
            out[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


def run_two_processes(script: str, out, cases, env_extra: dict) -> tuple[dict, dict]:
    """Run ``tests/<script>`` (a 2-process Lightning fit of each of ``cases``) with a hang bound; rank 0's and
    rank 1's results (the JSON files it writes under ``out``)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(tests / script), str(out / "r.json"), *cases]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, _ = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks: Lightning's launcher starts rank 1 in the same group
        pytest.fail(f"the 2-process run did not finish in {HANG} s: a hang")
    assert proc.returncode == 0, log.decode()[-4000:]
    return json.loads((out / "r.json").read_text()), json.loads((out / "r.json.rank1").read_text())


def logged_numbers(entry: dict) -> dict[str, float]:
    """A reading's logged numbers, without its seconds."""
    return {k: v for k, v in entry.items() if k.startswith("xattn/") and k != "xattn/seconds"}


def max_difference(a: list[dict], b: list[dict]) -> float:
    """The largest difference between two runs' logged numbers, reading by reading (the same keys in each)."""
    assert len(a) == len(b) and a
    worst = 0.0
    for x, y in zip(a, b):
        assert logged_numbers(x).keys() == logged_numbers(y).keys()
        worst = max([worst, *(abs(logged_numbers(x)[k] - logged_numbers(y)[k]) for k in logged_numbers(x))])
    return worst


def same_weights(a: dict, b: dict) -> bool:
    """Whether two state dicts hold the same tensors, bit for bit."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_rank_results(path: str, results: dict) -> None:
    """A 2-process run's results of this rank: ``path`` on rank 0, ``path.rank<r>`` on the others."""
    import json
    import os

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    with open(path if rank == 0 else f"{path}.rank{rank}", "w") as fh:
        json.dump(results, fh, indent=1, default=str)


#: the oracle's true regions: encoder frames of tokens 0..2 (input frames x2)
ORACLE_REGIONS = [range(0, 4), range(4, 8), range(8, 12)]
def _method_names() -> tuple[str, ...]:
    from typing import get_args

    from xattn_lightning.saliency import MethodName

    return get_args(MethodName)


#: every saliency method, the perturbation ones first (the registry's names)
SALIENCY_METHODS = _method_names()


def speaking_explain(**opts):
    """One explanation of a tiny Whisper that speaks, by both SPES methods."""
    import xattn_lightning as xl

    m = speaking_tiny_whisper()
    return xl.explain(m, whisper_batch(m, lengths=(60,)), methods=("spes", "encoder_spes"), max_new_tokens=5, **opts)[0]


def module_state(model) -> tuple:
    """What explaining must leave as it was: the attention kernel, every module's train flag, every parameter's
    ``requires_grad``."""
    return (
        getattr(model.config, "_attn_implementation", None) if hasattr(model, "config") else None,
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


#: the English-only Whisper vocabulary: the tokenizer's special ids need all of it
EN_VOCAB = 51864


def tiny_dims(n_audio_ctx: int = 50):
    """The dimensions of a tiny openai-whisper model."""
    from whisper.model import ModelDimensions

    return ModelDimensions(
        n_mels=80, n_audio_ctx=n_audio_ctx, n_audio_state=16, n_audio_head=2, n_audio_layer=1,
        n_vocab=EN_VOCAB, n_text_ctx=24, n_text_state=16, n_text_head=2, n_text_layer=2,
    )  # fmt: skip


def random_whisper(n_audio_ctx: int = 50, seed: int = 0):
    """A random openai-whisper model (the package leaves the decoder's positions uninitialised)."""
    import torch
    from whisper.model import Whisper

    torch.manual_seed(seed)
    model = Whisper(tiny_dims(n_audio_ctx))
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 0.02)
    return model.eval()


def openai_whisper_checkpoint(tmp_path, n_audio_ctx: int = 1500):
    """A random openai-whisper checkpoint file, as ``whisper.load_model`` reads it."""
    import dataclasses

    import torch

    dims = tiny_dims(n_audio_ctx)
    path = tmp_path / "tiny-random.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": random_whisper(n_audio_ctx).state_dict()}, path)
    return path


def mel_batch(lengths=(37, 80), window: int = 100, seed: int = 0) -> dict:
    """openai-whisper's log-mel input: 80 bins, ``window`` frames, each utterance's own length of noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(lengths), 80, window), -0.5)
    for b, n in enumerate(lengths):
        x[b, :, :n] = torch.randn(80, n, generator=g)
    return {"input_features": x}


def fit_demo(tmp_path, monitor=None, logger=False, seed=0, lr=3e-3, **kw):
    """A short fit of the demo model (48 training and 6 validation utterances) on CPU, with ``monitor``."""
    import lightning.pytorch as pl

    from xattn_lightning.demo import DemoModule, loaders

    pl.seed_everything(seed)
    model = DemoModule(lr=lr)
    tr, va = loaders(48, 6, batch_size=8)
    trainer = cpu_trainer(tmp_path, [monitor] if monitor else [], logger, **kw)
    trainer.fit(model, tr, va)
    return model, trainer
