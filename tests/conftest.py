import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _own_disk_cache(tmp_path_factory, monkeypatch):
    """Each test its own empty disk cache (head choices), so that no test reads what another one (or a user) kept."""
    monkeypatch.setenv("XATTN_LIGHTNING_CACHE", str(tmp_path_factory.mktemp("xl-cache")))


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
