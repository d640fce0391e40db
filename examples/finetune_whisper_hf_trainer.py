"""Fine-tune Hugging Face Whisper with ``Seq2SeqTrainer``, the most copied recipe, with the monitor on.

The recipe's pieces as people write them (``DataCollatorSpeechSeq2SeqWithPadding``,
``Seq2SeqTrainingArguments(predict_with_generate=True, report_to=...)``); the two lines that add the monitor
are marked ``# <-- xattn_lightning``.

    python examples/finetune_whisper_hf_trainer.py --model openai/whisper-tiny.en \
        --manifest train.tsv --eval-manifest dev.tsv --max-steps 100 --out runs/hf

The manifest is ``id<TAB>audio<TAB>text`` (audio paths relative to it; a ``words`` column of true word
timings makes each reading also log ``xattn/timestamps/*``). W&B logs offline unless ``WANDB_API_KEY`` is
set (``--report-to none`` for no integration). ``--no-monitor`` runs the same fine-tune without it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from xattn_lightning.audio import load_audio, read_manifest
from xattn_lightning.integrations.transformers import XAttnSaliencyCallback  # <-- xattn_lightning


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """The recipe's collator: log-mel features padded by the feature extractor, labels padded with -100."""

    processor: Any
    decoder_start_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_features = [{"input_features": f["input_features"]} for f in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
        label_features = [{"input_ids": f["labels"]} for f in features]
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def prepare(manifest: str, processor: WhisperProcessor) -> list[dict[str, Any]]:
    """The recipe's ``prepare_dataset``: audio to log-mel features, text to label ids."""
    out = []
    for row in read_manifest(manifest):
        audio = load_audio(row.audio, 16000).numpy()
        item = {
            "input_features": processor.feature_extractor(audio, sampling_rate=16000).input_features[0],
            "labels": processor.tokenizer(row.text).input_ids,
            "id": row.id,  # the collator leaves these out; the monitor shows them (words: word-timestamp scores)
            "text": row.text,
        }
        if row.words:
            item["words"] = [list(w) for w in row.words]
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an HF Whisper id or directory, e.g. openai/whisper-tiny.en")
    p.add_argument("--manifest", required=True)
    p.add_argument("--eval-manifest", required=True)
    p.add_argument("--out", default="runs/hf-trainer")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--report-to", default="wandb", help="'wandb', 'tensorboard', 'none', ...")
    p.add_argument("--num-probes", type=int, default=4)
    p.add_argument("--n-masks", default="auto", help="masks per saliency map, or 'auto'")
    p.add_argument("--max-overhead", default="0.1", help="the monitor's share of training time, or 'none'")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-monitor", action="store_true", help="the same fine-tune without the monitor")
    args = p.parse_args(argv)

    processor = WhisperProcessor.from_pretrained(args.model)
    model = WhisperForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager")
    model.generation_config.forced_decoder_ids = None
    train, evaluation = prepare(args.manifest, processor), prepare(args.eval_manifest, processor)
    training_args = Seq2SeqTrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        logging_steps=max(1, args.eval_steps // 2),
        save_strategy="no",
        predict_with_generate=True,
        generation_max_length=64,
        report_to=args.report_to,
        remove_unused_columns=False,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
        processing_class=processor,
    )
    if not args.no_monitor:
        n_masks = args.n_masks if args.n_masks == "auto" else int(args.n_masks)
        overhead = None if args.max_overhead == "none" else float(args.max_overhead)
        monitor = XAttnSaliencyCallback(trainer, num_probes=args.num_probes, n_masks=n_masks, max_overhead=overhead)
        trainer.add_callback(monitor)  # <-- xattn_lightning
    trainer.train()
    return {"trainer": trainer, "model": model, "log_history": trainer.state.log_history}


if __name__ == "__main__":
    main()
