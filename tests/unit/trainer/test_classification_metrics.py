"""Macro figures over the classes the test split holds; an absent class is listed, not averaged in as 0."""

from __future__ import annotations

import pytest

from finetune.trainer.classification import classification_metrics


def test_a_class_without_test_rows_is_listed_and_left_out_of_the_macro_figures() -> None:
    names = ["neg", "neu", "pos"]
    y_true = [0, 0, 2, 2, 2, 0]  # no "neu" row in the test split
    y_pred = [0, 1, 2, 2, 0, 0]
    m = classification_metrics(y_true, y_pred, names)
    assert m["classes_absent"] == ["neu"]
    per = m["per_class"]
    assert per["neu"]["support"] == 0
    # The mean over the two classes present, not over three with a 0 for "neu".
    assert m["f1"] == pytest.approx((per["neg"]["f1"] + per["pos"]["f1"]) / 2)
    assert m["recall"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_every_class_present_gives_the_usual_macro_average() -> None:
    m = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], ["a", "b"])
    assert m["classes_absent"] == [] and m["recall"] == pytest.approx((1.0 + 0.5) / 2)
