"""The feedback store: one JSON object per line, appended with flush + fsync before the client hears OK.

Format (documented in docs/server.md, read by a later FineTuneJob with `dataset.format: jsonl`,
`textColumn: input`, `labelColumn: label`):

    {"id": "...", "time": "2026-01-01T12:00:00.000000+00:00", "model": "sst2", "model_version": "ab12...",
     "input": "great film", "label": "positive", "prediction": "negative"}

Causal-LM feedback carries `"completion"` instead of `"label"`.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class FeedbackStore:
    """Durable, append-only JSONL. Thread-safe; call `append` off the event loop (it fsyncs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a+b")
        self._repair_tail()
        self.count = 0

    def _repair_tail(self) -> None:
        # A crash mid-write can leave a half line; start on a fresh line so the next record stays valid
        # (readers skip the one broken line).
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() == 0:
            return
        self._file.seek(-1, os.SEEK_END)
        if self._file.read(1) != b"\n":
            self._write(b"\n")

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Stamp `time`, write one line durably, and return the stored record."""
        stored = {"id": record["id"], "time": datetime.now(UTC).isoformat(), **record}
        # allow_nan=False: the store is strict JSON, readable by any parser (the request model refuses NaN).
        line = json.dumps(stored, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            if self._file.closed:
                raise RuntimeError("the feedback store is closed")
            self._write(line)
            self.count += 1
        return stored

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()


def read_feedback(path: Path) -> list[dict[str, Any]]:
    """All complete records in a store (a torn last line from a crash is skipped)."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records
