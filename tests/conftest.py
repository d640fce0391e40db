import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _env_path(name: str) -> str:
    value = os.environ.get(name)
    if not value or not os.path.exists(value):
        pytest.skip(f"{name} is not set to an existing path (the real model/speech for integration tests)")
    return value


@pytest.fixture(scope="session")
def whisper_path() -> str:
    return _env_path("XL_WHISPER_PATH")


@pytest.fixture(scope="session")
def espeak_manifest() -> str:
    return _env_path("XL_ESPEAK_MANIFEST")


@pytest.fixture(scope="session")
def real_whisper(whisper_path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    proc = WhisperProcessor.from_pretrained(whisper_path)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_path).eval()
    return model, proc
