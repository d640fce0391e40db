"""Sharded checkpoint directories (torch distributed checkpoints, DeepSpeed) as one Lightning ``.ckpt`` file, with
torch's and Lightning's own consolidation utilities; ``compare`` reads sharded checkpoints through it."""

from __future__ import annotations

import os
from pathlib import Path

from xattn_lightning.errors import XAttnError, first_line


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
