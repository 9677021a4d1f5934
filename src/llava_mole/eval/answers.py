"""Helpers shared by the answer metrics: reference lists, SQuAD normalisation, edit distance.

Kept apart from the metric modules so that the official reproductions
(:mod:`llava_mole.eval.metrics_official`), the lenient variants
(:mod:`llava_mole.eval.metrics_lenient`) and the registry (:mod:`llava_mole.eval.metrics`) can
all use them without importing each other.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["References", "levenshtein", "normalize_answer", "ref_list"]

References = str | Sequence[str]
"""One reference answer, or a non-empty sequence of them."""


def ref_list(refs: References) -> list[str]:
    """Return ``refs`` as a list of strings, rejecting an empty reference set.

    Raises:
        ValueError: ``refs`` is empty (a question without ground truth cannot be scored).
        TypeError: A reference is not a string.
    """
    if isinstance(refs, str):
        return [refs]
    out = list(refs)
    if not out:
        raise ValueError("refs must contain at least one reference answer")
    for ref in out:
        if not isinstance(ref, str):
            raise TypeError(f"reference answers must be str, got {type(ref).__name__}")
    return out


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Normalise a free-form answer the way the SQuAD evaluation script does.

    Steps, in order: lowercase; delete every ASCII punctuation character (``string.punctuation``,
    deleted rather than replaced by a space, so ``"x-ray"`` becomes ``"xray"``); remove the
    articles ``a``, ``an`` and ``the`` as whole words; collapse runs of whitespace to one space
    and strip the ends.

    Reference: https://rajpurkar.github.io/SQuAD-explorer/ (official v1.1 evaluation script).
    """
    s = s.lower().translate(_PUNCT_TABLE)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def levenshtein(a: str, b: str) -> int:
    """Levenshtein edit distance (unit-cost insertions, deletions and substitutions).

    Classic two-row dynamic programme over code points, ``O(len(a) * len(b))`` time and
    ``O(min)`` memory. It returns the same distances as lmms-eval's ``levenshtein_distance``.

    Reference: https://en.wikipedia.org/wiki/Levenshtein_distance
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute / match
                )
            )
        previous = current
    return previous[-1]
