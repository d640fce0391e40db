"""The monitor configured from a ``LightningCLI`` YAML file: every option a user sets is a typed constructor
argument, so the CLI accepts it, the monitor gets it, and the saved ``config.yaml`` records it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from xattn_lightning import XAttnSaliencyMonitor
from xattn_lightning.demo import DemoModule, loaders

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (in the [dev] extra)")


class DemoData(pl.LightningDataModule):
    def __init__(self, train_size: int = 16, val_size: int = 4, batch_size: int = 4) -> None:
        super().__init__()
        self.train, self.val = loaders(train_size, val_size, batch_size=batch_size)

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return self.val


CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 1
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: "{root}"}}
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  default_root_dir: {root}
  callbacks:
    - class_path: xattn_lightning.XAttnSaliencyMonitor
      init_args:
        num_probes: 2
        methods: [encoder_spes]
        targets: labels
        n_masks: 16
        seed: 3
        max_overhead: null
        layers: last
        saliency_options:
          p_h: 0.6
"""


def test_the_monitor_from_a_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    cli = LightningCLI(
        DemoModule, DemoData, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True}
    )
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, XAttnSaliencyMonitor)]
    assert (monitor.config.reading.saliency.n_masks, monitor.config.seed) == (16, 3)
    assert monitor.config.reading.saliency.encoder_spes.p_h == 0.6 and monitor.config.layers == "last" and monitor.config.targets == "labels"
    assert len(monitor.history) == 1 and monitor.history[0]["xattn/encoder_spes/n_masks"] == 16.0

    (saved,) = [p for p in Path(tmp_path).rglob("config.yaml") if p != config]
    recorded = yaml.safe_load(saved.read_text())["trainer"]["callbacks"]
    (entry,) = [c for c in recorded if c["class_path"].endswith("XAttnSaliencyMonitor")]
    assert entry["init_args"]["n_masks"] == 16 and entry["init_args"]["seed"] == 3
    assert entry["init_args"]["saliency_options"] == {"p_h": 0.6}


def test_a_misspelt_option_is_rejected_by_the_cli(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path).replace("n_masks: 16", "n_mask: 16"))
    with pytest.raises(SystemExit):
        LightningCLI(DemoModule, DemoData, args=["fit", "--config", str(config)])


class TwoFeatures(DemoModule):
    """A script whose batches hold two tensors shaped like the model's input (features and a copy for an
    augmentation): which one the model reads cannot be told from the batch."""

    def _loss(self, batch):
        return super()._loss({"input_features": batch["clean"], "labels": batch["labels"]})


class TwoFeaturesData(DemoData):
    def __init__(self) -> None:
        super().__init__()
        wrap = lambda b: {"clean": b["input_features"], "noisy": b["input_features"] + 0.1, "labels": b["labels"]}  # noqa: E731
        from torch.utils.data import DataLoader

        self.train = DataLoader([wrap(b) for b in self.train], batch_size=None)
        self.val = DataLoader([wrap(b) for b in self.val], batch_size=None)


def to_model_batch(batch):
    """The batch_fn a YAML config names by its import path."""
    return {"input_features": batch["clean"], "labels": batch["labels"]}


@pytest.mark.parametrize(
    "fix",
    ["", "batch_keys: {input_features: clean, labels: labels}", "batch_fn: test_lightning_cli:to_model_batch"],
)
def test_a_yaml_user_fixes_a_batch_with_batch_keys_or_a_batch_fn_path(tmp_path, fix):
    import warnings

    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path).replace("        layers: last\n", f"        {fix}\n" if fix else ""))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cli = LightningCLI(TwoFeatures, TwoFeaturesData, args=["fit", "--config", str(config)],
                           save_config_kwargs={"overwrite": True})  # fmt: skip
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, XAttnSaliencyMonitor)]
    said = [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message)]
    said = [m for m in said if "not logged" not in m and "no tokenizer" not in m]
    if not fix:
        assert monitor.history == [] and "'clean' or 'noisy'" in said[0] and "YAML: batch_keys: {input_features: clean}" in said[0]
        assert said[0].count("batch_fn=") == 1
    else:
        assert said == [] and len(monitor.history) == 1
