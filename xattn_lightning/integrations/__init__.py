"""Hosts of the monitor outside Lightning: :mod:`xattn_lightning.integrations.transformers` (the Hugging Face
``Trainer``/``Seq2SeqTrainer``)."""
