"""Command-line tools the deploy and monitoring tests run for real (installed by scripts/install-tools.sh)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def find_tool(name: str) -> str:
    """Path of a test tool: .tools/bin first, then PATH; skip (locally) or fail (CI) when missing."""
    local = ROOT / ".tools" / "bin" / name
    path = str(local) if os.access(local, os.X_OK) else shutil.which(name)
    if path:
        return path
    reason = f"`{name}` not found in .tools/bin or PATH; run `bash scripts/install-tools.sh`"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so a missing tool is an error)")
    pytest.skip(reason)
