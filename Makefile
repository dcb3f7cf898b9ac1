# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build lies on this machine's disk; installing it first keeps pip from pulling a CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: setup demo test lint crd bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m finetune.demo

test: setup
	$(BIN)/ruff check .
	MYPY=$(BIN)/mypy bash scripts/typecheck.sh
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	MYPY=$(BIN)/mypy bash scripts/typecheck.sh

crd: setup
	$(BIN)/finetune crd > manifests/crd.yaml
	cp manifests/crd.yaml charts/finetune-operator/crds/finetunejobs.finetune.dev.yaml

bench: setup
	$(BIN)/python benchmarks/trainer_throughput.py

clean:
	rm -rf $(VENV) out runs .pytest_cache .ruff_cache .mypy_cache .typecheck
