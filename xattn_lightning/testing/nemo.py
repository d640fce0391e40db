"""A tiny Canary-style NeMo attention-encoder-decoder model built offline from a config, for tests and examples.

No pretrained NeMo checkpoint is reachable offline, so tests build one: a SentencePiece tokenizer trained on a
few transcripts, Canary's special-token tokenizer, and ``EncDecMultiTaskModel`` with a 2-layer FastConformer
encoder and a 2-layer Transformer decoder (random weights, about 0.3 M parameters). Needs ``nemo-toolkit[asr]``
(the ``[nemo]`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def canary_config(tokenizer_dir: str | Path, train_manifest: str | None = None, val_manifest: str | None = None,
                  batch_size: int = 4, d_model: int = 64, layers: int = 2, heads: int = 4) -> dict[str, Any]:  # fmt: skip
    """The ``model`` config of a tiny Canary-style model (NeMo's ``fast-conformer_aed.yaml``, shrunk)."""
    tok = Path(tokenizer_dir)
    ds = {"use_lhotse": True, "sample_rate": 16000, "batch_size": batch_size, "num_workers": 0, "shuffle": False,
          "use_bucketing": False, "pin_memory": False}  # fmt: skip
    return {
        "sample_rate": 16000,
        "label_smoothing": 0.0,
        "context_len_for_AR_decoding": 5,
        "log_prediction": False,
        "prompt_format": "canary",
        "restore_timestamps_model": False,  # else the constructor downloads a CTC model
        "model_defaults": {"asr_enc_hidden": d_model, "lm_enc_hidden": d_model, "lm_dec_hidden": d_model},
        "train_ds": {**ds, "manifest_filepath": train_manifest, "shuffle": True} if train_manifest else None,
        "validation_ds": {**ds, "manifest_filepath": val_manifest} if val_manifest else None,
        "tokenizer": {
            "dir": None,
            "type": "agg",
            "langs": {
                "spl_tokens": {"dir": str(tok / "spl"), "type": "bpe"},
                "en": {"dir": str(tok / "en"), "type": "bpe"},
            },
            "custom_tokenizer": {
                "_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer",
                "tokenizers": None,
            },
        },
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "normalize": "per_feature",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": 64,
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 0.0,
            "pad_to": 0,
            "pad_value": 0.0,
        },  # fmt: skip
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 64,
            "feat_out": -1,
            "n_layers": layers,
            "d_model": d_model,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": 32,
            "causal_downsampling": False,
            "ff_expansion_factor": 2,
            "self_attention_model": "rel_pos",
            "n_heads": heads,
            "att_context_size": [-1, -1],
            "xscaling": False,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm",
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },  # fmt: skip
        "transf_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": 0,
            "hidden_size": d_model,
            "inner_size": 2 * d_model,
            "num_attention_heads": heads,
            "ffn_dropout": 0.0,
            "attn_score_dropout": 0.0,
            "attn_layer_dropout": 0.0,
            "mask_future": False,
            "pre_ln": True,
            "pre_ln_final_layer_norm": True,
        },  # fmt: skip
        "transf_decoder": {
            "_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
            "model_name": None,
            "pretrained": False,
            "encoder": None,
            "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": 128,
                "num_token_types": 0,
                "embedding_dropout": 0.0,
                "learn_positional_encodings": False,
                "hidden_size": d_model,
                "inner_size": 2 * d_model,
                "num_layers": layers,
                "num_attention_heads": heads,
                "ffn_dropout": 0.0,
                "attn_score_dropout": 0.0,
                "attn_layer_dropout": 0.0,
                "hidden_act": "relu",
                "pre_ln": True,
                "vocab_size": None,
            },
        },  # fmt: skip
        "head": {
            "_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
            "num_layers": 1,
            "activation": "relu",
            "log_softmax": True,
            "hidden_size": d_model,
            "num_classes": None,
            "dropout": 0.0,
            "use_transformer_init": True,
        },  # fmt: skip
        "loss": {
            "_target_": "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
            "label_smoothing": 0.0,
            "pad_id": None,
        },  # fmt: skip
        "optim": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.0},
    }


def _sentencepiece(texts: Sequence[str], out: Path, name: str, vocab_size: int, **special: bool) -> None:
    """Train a BPE SentencePiece model on ``texts`` into ``out / name`` unless one is there (``special``: ``bos``,
    ``eos``, ``pad`` of ``create_spt_model``); the corpus is ``out / f"text_{name}.txt"``."""
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / f"text_{name}.txt"
    corpus.write_text("\n".join(texts) + "\n")
    if not (out / name / "tokenizer.model").exists():
        create_spt_model(str(corpus), vocab_size=vocab_size, sample_size=-1, do_lower_case=False,
                         tokenizer_type="bpe", output_dir=str(out / name), **special)  # fmt: skip


def build_tokenizers(texts: Sequence[str], out: str | Path, vocab_size: int = 128) -> Path:
    """Train the English SentencePiece model on ``texts`` and build Canary's special-token tokenizer in ``out``."""
    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer

    out = Path(out)
    _sentencepiece(texts, out, "en", vocab_size)
    if not (out / "spl" / "tokenizer.model").exists():
        CanaryTokenizer.build_special_tokenizer(["translate", "transcribe", "en"], str(out / "spl"))
    return out


def nemo_manifest(rows: Sequence[Any], path: str | Path) -> Path:
    """A NeMo JSON-lines manifest (Canary's fields) from :class:`~xattn_lightning.audio.ManifestRow`s."""
    import soundfile as sf

    lines = []
    for r in rows:
        info = sf.info(str(r.audio))
        lines.append(json.dumps({"audio_filepath": str(r.audio), "duration": info.frames / info.samplerate,
                                 "text": r.text, "lang": "en", "source_lang": "en", "target_lang": "en", "pnc": "yes",
                                 "taskname": "asr"}))  # fmt: skip
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def tiny_canary(tokenizer_dir: str | Path, trainer: Any = None, seed: int = 0, **config: Any) -> Any:
    """An ``EncDecMultiTaskModel`` with random weights from :func:`canary_config`."""
    import torch
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.collections.asr.parts.submodules.multitask_decoding import MultiTaskDecodingConfig
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(canary_config(tokenizer_dir, **config))
    decoding = OmegaConf.structured(MultiTaskDecodingConfig)
    decoding.strategy = "greedy"
    cfg.decoding = decoding
    torch.manual_seed(seed)
    return EncDecMultiTaskModel(cfg=cfg, trainer=trainer)


def transf_bpe_config(tokenizer_dir: str | Path, d_model: int = 64, layers: int = 2, heads: int = 4) -> dict[str, Any]:
    """The config of a tiny ``EncDecTransfModelBPE`` (a plain SentencePiece tokenizer with BOS, EOS and pad)."""
    canary = canary_config(tokenizer_dir, d_model=d_model, layers=layers, heads=heads)
    decoder = {**canary["transf_decoder"]["config_dict"], "library": "nemo", "model_name": None, "pretrained": False,
               "pre_ln_final_layer_norm": True}  # fmt: skip
    return {
        "sample_rate": 16000,
        "label_smoothing": 0.0,
        "tokenizer": {"dir": str(Path(tokenizer_dir) / "bpe"), "type": "bpe"},
        "preprocessor": canary["preprocessor"],
        "encoder": canary["encoder"],
        "transf_encoder": canary["transf_encoder"],
        "transf_decoder": decoder,
        "head": {k: v for k, v in canary["head"].items() if k not in ("_target_", "hidden_size", "num_classes")},
        "beam_search": {"beam_size": 1, "len_pen": 0.0, "max_generation_delta": 20},
        "optim": canary["optim"],
    }


def tiny_transf_bpe(texts: Sequence[str], out: str | Path, seed: int = 0) -> Any:
    """An ``EncDecTransfModelBPE`` with random weights, its tokenizer trained on ``texts`` in ``out``."""
    import torch
    from nemo.collections.asr.models import EncDecTransfModelBPE
    from omegaconf import OmegaConf

    out = Path(out)
    _sentencepiece(texts, out, "bpe", 96, bos=True, eos=True, pad=True)
    torch.manual_seed(seed)
    return EncDecTransfModelBPE(cfg=OmegaConf.create(transf_bpe_config(out)))
