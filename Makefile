# make demo : set up (virtual environment + pinned packages), build the demo shards, train on them
# make test : same set-up, then the whole test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)
# DeepSpeed caches its JIT-compiled CPU comm op here, inside the venv, so a fresh clone builds it once.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(STAMP)

demo: setup
	$(BIN)/python -m vitbench.demo
	WANDB_MODE=offline $(BIN)/accelerate launch --config_file accelerate_configs/cpu_1x2.yaml train_vit.py --demo \
	    --output-dir runs/demo --resume auto
	$(BIN)/python report.py runs/demo --lang en --out runs/demo/report

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: setup
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/profiler_overhead.py

clean:
	rm -rf runs shards/demo bench/out
