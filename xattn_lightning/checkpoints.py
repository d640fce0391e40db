"""Loading the checkpoints ``compare`` reads (:func:`load_checkpoint`: Hugging Face directories and hub ids, PEFT
adapters, Lightning ``.ckpt`` files), sharded checkpoint directories (torch distributed checkpoints, DeepSpeed)
first made one ``.ckpt`` file with torch's and Lightning's own consolidation utilities."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from xattn_lightning.adapters import adapter_for
from xattn_lightning.errors import XAttnError, first_line
from xattn_lightning.loading import load_hf_model


def consolidate_sharded_checkpoint(path: str | os.PathLike, output_file: str | os.PathLike) -> Path:
    """Write the sharded checkpoint directory ``path`` as one Lightning ``.ckpt`` file ``output_file`` that
    ``LightningModule.load_from_checkpoint`` reads (the whole model in CPU memory), with torch's and
    Lightning's own consolidation:

    * a ``torch.distributed.checkpoint`` directory (``.metadata`` and ``__<rank>_0.distcp`` shards), as
      Lightning's ``FSDPStrategy(state_dict_type="sharded")`` and ``ModelParallelStrategy`` save it: torch's
      ``dcp_to_torch_save``, with Lightning's ``meta.pt`` (hyperparameters, loops) merged back, as
      ``lightning.fabric.utilities.consolidate_checkpoint`` does;
    * a DeepSpeed checkpoint directory (``latest``, ``checkpoint/*_model_states.pt``): Lightning's
      ``convert_zero_checkpoint_to_fp32_state_dict`` (DeepSpeed's ``zero_to_fp32``; needs deepspeed).

    A shard listed in the metadata but absent is named in the error, before anything is read.

    >>> consolidate_sharded_checkpoint("/no/such/dir", "/tmp/x.ckpt")
    Traceback (most recent call last):
    ...
    xattn_lightning.errors.XAttnError: '/no/such/dir' is not a sharded checkpoint directory: no .metadata (torch.distributed.checkpoint) nor latest (DeepSpeed) in it.
    """
    import torch

    folder, out = Path(path), Path(output_file)
    if (folder / ".metadata").is_file():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        shards = sorted(
            {info.relative_path for info in FileSystemReader(str(folder)).read_metadata().storage_data.values()}
        )
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise XAttnError(
                f"{str(folder)!r} misses {len(missing)} of its {len(shards)} shards ({', '.join(missing)}): a sharded "
                "checkpoint needs the files every process saved; copy the whole directory."
            )
        try:
            dcp_to_torch_save(str(folder), str(out))
            ckpt = torch.load(out, map_location="cpu", weights_only=False)
        except Exception as err:
            raise XAttnError(f"Cannot consolidate {str(folder)!r}: {type(err).__name__}: {first_line(err)}") from err
        extra = folder / "meta.pt"  # Lightning's file of everything but weights and optimizer states
        if extra.is_file():
            ckpt.update(torch.load(extra, map_location="cpu", weights_only=False))
        if "state_dict" not in ckpt and "model" in ckpt:  # FSDPStrategy names the weights "model"
            ckpt["state_dict"] = ckpt.pop("model")
        torch.save(ckpt, out)
        return out
    if (folder / "latest").is_file() or (folder / "checkpoint").is_dir():
        try:
            import deepspeed  # noqa: F401
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
        except ImportError as err:
            raise XAttnError(
                f"{str(folder)!r} is a DeepSpeed checkpoint; consolidating it needs deepspeed (pip install deepspeed)."
            ) from err
        try:
            convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(out))
        except Exception as err:
            raise XAttnError(f"Cannot consolidate {str(folder)!r}: {type(err).__name__}: {first_line(err)}") from err
        return out
    raise XAttnError(
        f"{str(folder)!r} is not a sharded checkpoint directory: no .metadata (torch.distributed.checkpoint) nor "
        "latest (DeepSpeed) in it."
    )


def load_checkpoint(
    spec: str, module: str | None = None, processor: str | None = None, base_model: str | None = None
) -> tuple[Any, Any, str]:
    """Load ``spec`` (HF directory / hub id, a PEFT adapter directory onto ``base_model`` or the base
    its config names, or a Lightning ``.ckpt`` with ``module="pkg.mod:Class"``: a file, or a directory of
    shards as FSDP, ModelParallel and DeepSpeed save it, consolidated by
    :func:`~xattn_lightning.checkpoints.consolidate_sharded_checkpoint`).

    Returns ``(model, processor, name)``; the model is whatever :func:`xattn_lightning.adapter_for`
    accepts (for a LightningModule: its ``xattn_adapter`` or the HF model it wraps).
    """
    path = Path(spec.rstrip("/"))
    if path.suffix == ".ckpt":
        if not path.exists():
            raise XAttnError(f"Checkpoint {spec!r} does not exist.")
        if module is None:
            raise XAttnError(f"{spec!r} is a Lightning checkpoint; pass --module package.module:Class to load it.")
        cls: Any = _import_class(module)
        try:
            if path.is_dir():  # shards (FSDP, ModelParallel, DeepSpeed): consolidated into one file first
                with tempfile.TemporaryDirectory() as tmp:
                    whole = consolidate_sharded_checkpoint(path, Path(tmp) / path.name)
                    lit = cls.load_from_checkpoint(str(whole), map_location="cpu")
            else:
                lit = cls.load_from_checkpoint(str(path), map_location="cpu")
        except XAttnError:
            raise
        except Exception as err:
            raise XAttnError(f"Cannot load {spec!r} with {module}: {type(err).__name__}: {first_line(err)}") from err
        lit.eval()
        model = getattr(lit, "xattn_adapter", None) or lit
        proc = getattr(lit, "processor", None)
        if processor is not None:
            proc = load_hf_model_processor(processor)
        if proc is None:
            raise XAttnError(f"{module} has no .processor to turn audio into features; pass --processor HF_DIR_OR_ID.")
        _check_s2t(model, spec)
        return model, proc, path.stem
    model, proc = load_hf_model(spec, base_model=base_model)
    if processor is not None:
        proc = load_hf_model_processor(processor)
    return model, proc, path.name if path.exists() else spec


def load_hf_model_processor(name_or_path: str) -> Any:
    """Only the processor of a Hugging Face checkpoint."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(name_or_path)
    except Exception as err:
        raise XAttnError(f"Cannot load a processor from {name_or_path!r}: {first_line(err)}") from err


def _check_s2t(model: Any, spec: str) -> None:
    try:
        adapter_for(model)
    except XAttnError as err:
        raise XAttnError(f"{spec!r} is not a speech-to-text encoder-decoder this tool can read: {err}") from err


def _import_class(spec: str) -> type:
    mod_name, sep, cls_name = spec.partition(":")
    if not sep or not mod_name or not cls_name:
        raise XAttnError(f"Expected --module as package.module:Class but got {spec!r}.")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # modules of the current directory, as `python -m` would find them
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:
        raise XAttnError(f"Cannot import {mod_name!r}: {type(err).__name__}: {first_line(err)}") from err
    cls = getattr(mod, cls_name, None)
    if cls is None or not hasattr(cls, "load_from_checkpoint"):
        raise XAttnError(f"{spec!r} is not a LightningModule class.")
    return cls
