"""One import namespace that shadows nothing in the standard library."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_components_live_under_finetune_namespace() -> None:
    import finetune.operator
    import finetune.server
    import finetune.trainer

    assert Path(finetune.operator.__file__).parent == ROOT / "operator"
    assert Path(finetune.trainer.__file__).parent == ROOT / "trainer"
    assert Path(finetune.server.__file__).parent == ROOT / "server"


def test_plain_operator_is_the_standard_library() -> None:
    code = "import operator, sys; sys.stdout.write(operator.__file__ or '')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert not out.stdout.startswith(str(ROOT / "operator"))
    assert hasattr(__import__("operator"), "itemgetter")


def test_crd_command_prints_the_crd() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "crd"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "kind: CustomResourceDefinition" in out.stdout
