# strm: the two commands a new user runs are `make demo` and `make test`; both install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATASET ?= hmdb51
VIDEOS  ?=
ONLY    ?=
DEVICE  ?= cuda
SIZE    ?= paper
# Spin-waiting OpenMP threads slow torch's small operations several-fold on a shared CPU.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test lint format faults demo extract bench gpu-check clean

# The stamp is older than pyproject.toml when the dependencies changed: reinstall then.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! command -v ffmpeg >/dev/null 2>&1; then \
		echo "installing FFmpeg's libraries for torchcodec (apt-get install -y ffmpeg)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null) \
		|| echo "could not install FFmpeg: decoding will fall back to PyAV"; \
	fi
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Faults tried at random: extraction, train-heads and finetune each killed (SIGKILL) at KILLS seeded
# random moments and resumed, then compared with an uninterrupted run (the suite lands 2 kills each).
KILLS ?= 20
SEED  ?= 0
faults: $(STAMP)
	STRM_FAULT_KILLS=$(KILLS) STRM_FAULT_SEED=$(SEED) $(BIN)/python -m pytest -q -s -k random_moments \
		tests/test_extract.py tests/test_train.py tests/test_finetune.py

# Style, types and layers (pyproject.toml holds each tool's settings): ruff's rules and formatting,
# mypy over pipeline/ and stages/, and import-linter's contracts (the data flow's layers).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(STAMP)
	$(BIN)/strm demo

# Manifest, then extraction, with the paper's defaults (ResNet-50, 4 views, 256/224).
extract: $(STAMP)
	@test -n "$(VIDEOS)" || { echo "usage: make extract DATASET=hmdb51 VIDEOS=/path/to/videos"; exit 2; }
	$(BIN)/strm manifest $(DATASET) --videos $(VIDEOS) --out data_manifests/local/$(DATASET).csv
	$(BIN)/strm extract $(DATASET) --videos $(VIDEOS) --manifest data_manifests/local/$(DATASET).csv --backbone resnet50

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(if $(ONLY),--only $(ONLY))

# Every CUDA path at the paper's sizes (SIZE=tiny DEVICE=cpu: the same steps, small, on a CPU); writes
# runs/gpu_check.json. No install: a lent GPU machine may have no venv, and runs its own python3.
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m benchmarks.gpu_check --device $(DEVICE) --size $(SIZE)

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
