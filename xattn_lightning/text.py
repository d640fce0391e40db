"""Word error rate with a light English normaliser (lower case, no punctuation)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCT = re.compile(r"[^\w\s']")


def normalize_text(text: str) -> list[str]:
    """Lower-case words without punctuation.

    >>> normalize_text("Hello, World!")
    ['hello', 'world']
    """
    return _PUNCT.sub(" ", text.lower()).split()


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences.

    >>> edit_distance("kitten", "sitting")
    3
    """
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate in percent (errors / reference words × 100).

    >>> round(wer(["the cat sat"], ["the cat sat down"]), 2)
    33.33
    """
    from torchmetrics.functional.text import word_error_rate

    refs = [" ".join(normalize_text(r)) for r in references]
    hyps = [" ".join(normalize_text(h)) for h in hypotheses]
    if len(refs) != len(hyps):
        raise ValueError(f"Got {len(hyps)} hypotheses for {len(refs)} references.")
    if not any(refs):  # no reference words: every hypothesis word is an error
        return 100.0 * sum(len(h.split()) for h in hyps)
    return 100.0 * float(word_error_rate(hyps, refs))
