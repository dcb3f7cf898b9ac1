"""The feedback store: durable JSONL, one record per line, survives a torn last line."""

from __future__ import annotations

import json

from finetune.server.feedback import FeedbackStore, read_feedback


def test_records_are_appended_one_json_object_per_line(tmp_path):
    path = tmp_path / "deep" / "feedback.jsonl"
    store = FeedbackStore(path)
    stored = store.append({"id": "a", "model": "m", "model_version": "v", "input": "héllo", "label": "x",
                           "prediction": None})
    store.close()
    assert list(stored) == ["id", "time", "model", "model_version", "input", "label", "prediction"]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["input"] == "héllo"


def test_reopening_appends_and_repairs_a_torn_line(tmp_path):
    path = tmp_path / "feedback.jsonl"
    first = FeedbackStore(path)
    first.append({"id": "1", "input": "a", "label": "x"})
    first.close()
    with path.open("ab") as handle:  # a crash in the middle of a write
        handle.write(b'{"id": "2", "inp')
    second = FeedbackStore(path)
    second.append({"id": "3", "input": "c", "label": "y"})
    second.close()
    assert [r["id"] for r in read_feedback(path)] == ["1", "3"]
