# make setup     : the virtual environment .venv with the pinned packages and the project installed editable (again only when pyproject.toml changes)
# make demo      : set-up, the demo shards, a 2-process training run on them, its table (runs/demo/)
# make test      : set-up, then the whole test suite (what CI runs)
# make test-fast : set-up, then the unit layer (tests/unit: in-process, no training launch)
# make bench     : set-up, then the loader and profiler-overhead benchmarks (bench/out/)
# make clean     : remove what demo and bench made (runs/demo, shards/demo, bench/out); nothing else
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# DeepSpeed caches its JIT-compiled CPU comm op here, inside the venv, so a fresh clone builds it once, with the
# venv's pinned ninja (its bin first on PATH, as in an activated venv: another ninja would rebuild the op).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -c "from vitbench.device import build_jit_ops; print('JIT op ready:', build_jit_ops() or 'none needed')"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m vitbench.data.demo
	WANDB_MODE=offline $(BIN)/accelerate launch --config_file accelerate_configs/cpu_1x2.yaml train_vit.py --demo --vendor cpu \
	    --output-dir runs/demo --resume auto
	$(BIN)/python report.py runs/demo --lang en --out runs/demo/report
	$(BIN)/python report.py runs/demo --vendor-readme > runs/demo/report/README.seed.md && echo "wrote runs/demo/report/README.seed.md"

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests/unit

bench: setup
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/profiler_overhead.py

# Only what these targets made: runs/ is also the default home of real runs (runs/<run-name>), never removed here.
clean:
	rm -rf runs/demo shards/demo shards/.demo.lock .demo.lock bench/out
