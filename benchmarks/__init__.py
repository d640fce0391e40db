"""Benchmarks of xattn_lightning (``python -m benchmarks.<name>``; each writes its numbers to ``benchmarks/results``).

A benchmark must not read a head choice kept on disk by an earlier run (``xl.word_timestamps``' default keeps one per
model): unless ``XATTN_LIGHTNING_CACHE`` is set, each benchmark process gets an empty cache of its own.
"""

import os
import tempfile

os.environ.setdefault("XATTN_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="xl-bench-cache-"))
