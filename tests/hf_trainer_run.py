"""A Hugging Face ``Trainer`` fine-tune of a tiny random Whisper with ``XAttnSaliencyCallback``, run in one
process or under ``torchrun`` (tests/unit/test_hf_trainer.py compares the two). Learning rate 0: the model stays
the same, so every reading must be the same whatever the number of processes.

    python tests/hf_trainer_run.py OUT_JSON            # one process
    torchrun --nproc_per_node 2 tests/hf_trainer_run.py OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_whisper  # noqa: E402

from xattn_lightning.integrations.transformers import XAttnSaliencyCallback  # noqa: E402


def collate(items: list[dict]) -> dict:
    return {
        "input_features": torch.stack([i["input_features"] for i in items]),
        "labels": torch.stack([i["labels"] for i in items]),
    }


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_features": torch.randn(16, 200, generator=g),
            "labels": torch.randint(0, 50, (6,), generator=g),
            "id": f"u{i}",
        }
        for i in range(8)
    ]
    model = tiny_whisper(seed=0).train()
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out), "trainer"), per_device_train_batch_size=2, max_steps=4,
        learning_rate=0.0, eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, dataloader_num_workers=0, logging_steps=2, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data[:4], eval_dataset=data[4:], data_collator=collate)
    callback = XAttnSaliencyCallback(trainer, num_probes=3, n_masks=16, targets="labels", max_overhead=None)
    trainer.add_callback(callback)
    trainer.train()
    if trainer.is_world_process_zero():
        with open(out, "w") as f:
            json.dump({"history": callback.history, "probe_ids": callback.instrument.collector.probe_set.ids,
                       "log_history": trainer.state.log_history,
                       "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, f)  # fmt: skip
    # a Gloo process group still alive at interpreter exit can abort the process ("terminate called without an
    # active exception", exit -6) after the work is done, with or without the callback: end it as scripts should
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    with open(f"{out}.rank{os.environ.get('RANK', '0')}.done", "w") as f:  # this process finished its work
        f.write("done\n")


if __name__ == "__main__":
    main(sys.argv[1])
