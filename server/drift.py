"""Input drift: the live input-length and predicted-label distributions against the training baseline.

The trainer writes `baseline.json` beside the model (see docs/server.md); the server keeps the last
`window` inputs and reports the Population Stability Index per feature:

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with `a` the live and `e` the baseline bin fractions. Rules of thumb: < 0.1 stable, 0.1-0.25 moderate
shift, > 0.25 a different population. Empty bins are smoothed (additive, see `psi`) so one unseen bin
does not make the index infinite.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune import contracts

FEATURES = ("input_length", "predicted_label")
_ALPHA = 0.5  # additive smoothing for live counts (Jeffreys prior)
_EPS = 1e-4  # floor for baseline fractions


@dataclass(frozen=True)
class Baseline:
    """The training data's distributions, as written by the trainer to DIR/baseline.json."""

    label_distribution: dict[str, float]
    length_edges: list[float]  # bins are [edges[i], edges[i+1]); the last edge is a large sentinel
    length_fractions: list[float]

    @classmethod
    def from_dir(cls, model_dir: Path) -> Baseline | None:
        written = contracts.Baseline.in_folder(model_dir)
        if written is None:
            return None
        edges, fractions = written.input_length.edges, written.input_length.fractions
        if len(edges) != len(fractions) + 1:
            edges, fractions = [], []
        if not fractions and not written.label_distribution:
            return None
        return cls(written.label_distribution, edges, fractions)


def psi(expected: Sequence[float], counts: Sequence[int]) -> float:
    """PSI of live `counts` against `expected` fractions (same bins), both smoothed."""
    bins, total = len(expected), sum(counts)
    exp_total = sum(max(e, _EPS) for e in expected)
    value = 0.0
    for e, c in zip(expected, counts, strict=True):
        e_frac = max(e, _EPS) / exp_total
        a_frac = (c + _ALPHA) / (total + _ALPHA * bins)
        value += (a_frac - e_frac) * math.log(a_frac / e_frac)
    return value


class _Window:
    """Bin counts over the last `size` observations, updated in O(1) per observation."""

    def __init__(self, bins: int, size: int) -> None:
        self.counts = [0] * bins
        self._recent: deque[int] = deque(maxlen=size)

    def add(self, index: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            self.counts[self._recent[0]] -= 1
        self._recent.append(index)
        self.counts[index] += 1

    def __len__(self) -> int:
        return len(self._recent)


class DriftMonitor:
    """Sliding-window PSI per feature. Used from the event loop only, so it needs no lock."""

    def __init__(self, baseline: Baseline, labels: Iterable[str], *, window: int, min_samples: int) -> None:
        self._baseline = baseline
        self._min = min_samples
        self._lengths = _Window(len(baseline.length_fractions), window) if baseline.length_fractions else None
        self._labels: list[str] = []
        self._label_windows: _Window | None = None
        if baseline.label_distribution:
            self._labels = sorted(set(baseline.label_distribution) | set(labels))
            self._label_windows = _Window(len(self._labels), window)

    @property
    def features(self) -> list[str]:
        found = []
        if self._lengths is not None:
            found.append("input_length")
        if self._label_windows is not None:
            found.append("predicted_label")
        return found

    def observe(self, lengths: Iterable[int], labels: Iterable[str] = ()) -> None:
        if self._lengths is not None:
            edges = self._baseline.length_edges
            for n in lengths:
                index = bisect.bisect_right(edges, n) - 1
                self._lengths.add(min(max(index, 0), len(self._lengths.counts) - 1))
        if self._label_windows is not None:
            for label in labels:
                if label in self._labels:
                    self._label_windows.add(self._labels.index(label))

    def values(self) -> dict[str, float]:
        """PSI per feature; NaN until `min_samples` inputs were seen (too few to say anything)."""
        out: dict[str, float] = {}
        if self._lengths is not None:
            ok = len(self._lengths) >= self._min
            out["input_length"] = psi(self._baseline.length_fractions, self._lengths.counts) if ok else math.nan
        if self._label_windows is not None:
            ok = len(self._label_windows) >= self._min
            expected = [self._baseline.label_distribution.get(label, 0.0) for label in self._labels]
            out["predicted_label"] = psi(expected, self._label_windows.counts) if ok else math.nan
        return out
