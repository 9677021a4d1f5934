"""Selecting samples (``take`` / ``select`` / ``repeat``) and lazy sample sequences.

A mixture split is a concatenation of *parts*: a table of one dataset entry's valid samples and
the positions selected from it. A table is a plain list of `Sample`s (LLaVA JSON files, which
are parsed whole anyway) or a `llava_mole.data.hf_rows.HFRows`, the valid rows of a memory-mapped
Hugging Face split whose `Sample`s are built on access. `SampleView` is that concatenation as a
``Sequence[Sample]``: it holds small integer arrays (row indices, selected positions), never a
Python object per sample, and ``repeat: N`` appends the same part N times (no copy).

Selection is the same for lists and index arrays: `select_positions` picks exactly the positions
that `select_samples` picks, so a split read lazily has the same samples in the same order.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload

import numpy as np

from .formats import LoadReport, Sample

Take = Literal["all"] | int | float

__all__ = [
    "ListTable",
    "SampleTable",
    "SampleView",
    "Take",
    "note_duplicate_ids",
    "select_positions",
    "select_samples",
    "take_count",
]


def take_count(take: Take, available: int) -> int:
    """How many samples `take` selects out of `available`.

    ``all`` selects everything; an int N selects ``min(N, available)``; a fraction f selects
    ``round(f * available)`` (halves rounded up), at least 1 when anything is available.
    """
    if take == "all":
        return available
    if isinstance(take, float):
        if available == 0:
            return 0
        return min(available, max(1, math.floor(take * available + 0.5)))
    return min(int(take), available)


def select_positions(available: int, take: Take, select: str, seed: str | int) -> np.ndarray:
    """The positions (ascending, int64) that `take` / `select` pick out of `available`.

    ``first``: the first ones; ``random``: a subset drawn by ``random.Random(seed)``, kept in
    file order -- the same draw as `select_samples`.
    """
    k = take_count(take, available)
    if select == "first" or k == available:
        return np.arange(k, dtype=np.int64)
    picked = np.array(random.Random(seed).sample(range(available), k), dtype=np.int64)
    picked.sort()
    return picked


def select_samples(
    samples: Sequence[Sample], take: Take, select: str, seed: str | int
) -> list[Sample]:
    """Selects the samples `take` asks for.

    Args:
        samples: The valid samples of one dataset split, in file order.
        take: "all", a count or a fraction.
        select: "first" (the first ones) or "random" (a seeded random subset, kept in file
            order).
        seed: Seed of the random subset.

    Returns:
        The selected samples.
    """
    k = take_count(take, len(samples))
    if select == "first" or k == len(samples):
        return list(samples[:k])
    picked = sorted(random.Random(seed).sample(range(len(samples)), k))
    return [samples[i] for i in picked]


class SampleTable(Protocol):
    """The valid samples of one dataset split, by position."""

    def __len__(self) -> int: ...

    def sample(self, position: int) -> Sample: ...

    def iter_samples(self, positions: np.ndarray) -> Iterator[Sample]: ...

    def domains(self, positions: np.ndarray) -> list[str]: ...


@dataclass
class ListTable:
    """Samples already in memory (a LLaVA JSON file): positions index the list."""

    samples: list[Sample]
    lazy = False  # its samples exist already; nothing is built on access

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, position: int) -> Sample:
        return self.samples[position]

    def iter_samples(self, positions: np.ndarray) -> Iterator[Sample]:
        return (self.samples[p] for p in positions.tolist())

    def domains(self, positions: np.ndarray) -> list[str]:
        return list(dict.fromkeys(self.samples[p].domain for p in positions.tolist()))

    def sample_ids(self) -> Iterator[str]:
        return (s.id for s in self.samples)


@dataclass(frozen=True)
class Part:
    """Positions selected from one table (shared, not copied, by the repeats of a part)."""

    table: Any  # a SampleTable
    positions: np.ndarray


class SampleView(Sequence[Sample]):
    """A read-only ``Sequence[Sample]`` made of parts; samples are built on access.

    Memory: the parts' position arrays (8 bytes per selected sample, shared by repeats) plus
    what the tables hold (`HFRows`: 8 bytes per valid row).

    Args:
        parts: The parts in order; a part repeated N times appears N times (same object).
    """

    def __init__(self, parts: Sequence[Part]) -> None:
        self.parts: list[Part] = list(parts)
        sizes = [len(p.positions) for p in self.parts]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

    @property
    def lazy(self) -> bool:
        """Whether some samples are built on access (a table that is not a list)."""
        return any(getattr(p.table, "lazy", True) for p in self.parts)

    @property
    def offsets(self) -> np.ndarray:
        """Position of each part's first sample (and the total at the end)."""
        return self._offsets

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> SampleView: ...

    def __getitem__(self, index: int | slice) -> Sample | SampleView:
        if isinstance(index, slice):
            return self._slice(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for {n} samples")
        index %= n
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        part = self.parts[k]
        return part.table.sample(int(part.positions[index - self._offsets[k]]))

    def _slice(self, index: slice) -> SampleView:
        wanted = np.arange(len(self), dtype=np.int64)[index]
        return SampleView(list(self._parts_at(wanted)))

    def _parts_at(self, wanted: np.ndarray) -> Iterator[Part]:
        """Parts holding the samples at `wanted` (ascending positions of this view)."""
        for k, part in enumerate(self.parts):
            lo, hi = self._offsets[k], self._offsets[k + 1]
            local = wanted[(wanted >= lo) & (wanted < hi)] - lo
            if len(local):
                yield Part(part.table, part.positions[local])

    def __iter__(self) -> Iterator[Sample]:
        for part in self.parts:
            yield from part.table.iter_samples(part.positions)

    def domains(self) -> list[str]:
        """Domains of the samples, in order of first appearance (no sample is built)."""
        found: dict[str, None] = {}
        for part in self.parts:
            found.update(dict.fromkeys(part.table.domains(part.positions)))
        return list(found)


def _hashed_duplicates(table: Any) -> list[str]:
    """Ids of `table` (an `HFRows`) that occur more than once, in order of first occurrence.

    Exact: the 64-bit id hashes recorded while the rows were validated find the candidate rows,
    whose ids are then read and counted.
    """
    hashes = table.id_hashes
    if hashes is None or len(hashes) < 2:
        return []
    unique, counts = np.unique(hashes, return_counts=True)
    clashing = unique[counts > 1]
    if not len(clashing):
        return []
    candidates = np.flatnonzero(np.isin(hashes, clashing))
    return [s.id for s in table.iter_samples(candidates)]


def note_duplicate_ids(table: Any, where: str, report: LoadReport) -> None:
    """Two samples with one id are both kept (ids are labels, not keys) but said once.

    `table` is a list of samples, a `ListTable` or an `HFRows` (whose ids are compared through
    hashes, without keeping an id per row).
    """
    if isinstance(table, ListTable):
        ids: Iterator[str] | list[str] = table.sample_ids()
    elif isinstance(table, list):
        ids = (s.id for s in table)
    else:
        ids = _hashed_duplicates(table)
    seen: Counter[str] = Counter(ids)
    repeated = [i for i, n in seen.items() if n > 1]
    if repeated:
        extra = sum(seen[i] - 1 for i in repeated)
        report.warnings.append(
            f"{where}: {extra} samples repeat another sample's id (first: {repeated[0]!r}); "
            "both are kept, and predictions files list them by position"
        )
