"""Small synthetic data a tiny model learns in seconds (shared by the integration tests)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "lovely", "superb", "charming", "moving", "smart"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "ugly", "tedious", "messy"]
FILLER = ["the", "film", "is", "a", "story", "with", "actors", "and", "plot", "it", "was", "very"]


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """A sentiment task a tiny model learns in seconds: one polar word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.choices(FILLER, k=rng.randint(3, 14))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), "positive" if label else "negative", rng.choice(["en-us", "en-gb"])))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path
