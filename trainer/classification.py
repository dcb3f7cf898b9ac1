"""Text classification: tokenization, batches, prediction and metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

PAD_MULTIPLE = 8


def encode_texts(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to max_length, unpadded (batches pad later, per batch)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in encoded["input_ids"]]


def collate(
    input_ids: Sequence[Sequence[int]], pad_id: int, labels: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example, rounded up to a multiple of 8 (tensor-core friendly)."""
    longest = max(len(ids) for ids in input_ids)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, seq in enumerate(input_ids):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
    return batch


def scores_from_logits(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class figures and the confusion matrix.

    The macro figures average over the classes present in `y_true`: a class without a single true
    example has no recall, and counting it as 0 would understate every figure (and fool the gate).
    Such classes are listed under `classes_absent`.
    """
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    present = sorted(set(y_true))
    macro = (precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
             if present else (0.0, 0.0, 0.0, None))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "f1": float(macro[2]),
        "precision": float(macro[0]),
        "recall": float(macro[1]),
        "support": len(y_true),
        "classes_absent": [name for i, name in enumerate(label_names) if support[i] == 0],
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": {
            "labels": list(label_names),
            "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        },
    }


def group_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], groups: Sequence[str], label_names: Sequence[str]
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The headline metrics per group value, and the largest gap between any two groups (bias check)."""
    true, pred, grp = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups, dtype=object)
    per_group: dict[str, dict[str, float]] = {}
    for value in sorted(set(grp.tolist())):
        sel = grp == value
        m = classification_metrics(true[sel].tolist(), pred[sel].tolist(), label_names)
        per_group[str(value)] = {k: m[k] for k in ("accuracy", "f1", "precision", "recall", "support")}
    gaps = {
        k: (max(g[k] for g in per_group.values()) - min(g[k] for g in per_group.values())) if per_group else 0.0
        for k in ("accuracy", "f1")
    }
    return per_group, gaps
