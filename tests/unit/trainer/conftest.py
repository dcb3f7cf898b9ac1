"""Shared fixtures of the trainer unit tests: one torch thread, and the on-the-fly tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.trainer.causal_fixtures import one_thread, train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models train faster on one thread than on two fighting over a busy 2-core machine."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))
