#!/usr/bin/env bash
# mypy (strict, settings in pyproject.toml) over every module of the `finetune` distribution.
#
# The top-level folders operator/, trainer/ and server/ are installed as finetune.operator,
# finetune.trainer and finetune.server (package-dir in pyproject.toml); mypy cannot follow that mapping,
# and checking operator/ under its own name would shadow the standard library's `operator`. So this
# builds the installed layout as a tree of symlinks in .typecheck/ (gitignored) and checks that.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TREE="$ROOT/.typecheck/finetune"
rm -rf "$ROOT/.typecheck"
mkdir -p "$TREE"
for path in "$ROOT"/finetune/*; do
  ln -s "$path" "$TREE/$(basename "$path")"
done
for folder in operator trainer server; do
  ln -s "$ROOT/$folder" "$TREE/$folder"
done
cd "$ROOT"
exec "${MYPY:-$ROOT/.venv/bin/mypy}" "$@" .typecheck/finetune
