"""The box on kmock's emulator, in the namespace `ml`, with the `data` claim as a temporary folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from finetune.operator import k8s
from tests.integration.podbox.builders import NS
from tests.podbox import PodBox


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """The local folder of the `data` PersistentVolumeClaim, mounted at /workspace."""
    folder = tmp_path / "workspace"
    folder.mkdir()
    return folder


@pytest.fixture()
async def box(api: k8s.Api, tmp_path: Path, workspace: Path) -> AsyncIterator[PodBox]:
    async with PodBox(api, root=tmp_path / "box", claims={"data": workspace}, namespace_filter=(NS,),
                      grace_seconds=2.0) as the_box:  # fmt: skip
        yield the_box
