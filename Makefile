# Two user commands: `make demo` and `make test`. Both create .venv (Python 3.11) on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast gpu-bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so that nothing resolves a CUDA build of it.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# .[test] includes the t5 (text encoder) and serve (HTTP server) extras.
	$(PY) -m pip install -q -e '.[test]'
	@$(PY) -c "import importlib.util,sys; sys.exit('transformer_engine must not be installed on a CPU machine' if importlib.util.find_spec('transformer_engine') and not __import__('torch').cuda.is_available() else 0)"
	touch $(STAMP)

# The demo on real pixels (tools/demo.py): synthetic shape clips -> shards through the shipped tiny VAE ->
# the tiny DiT trained on them -> a chunk-wise prompted 128x128 mp4 + frame strip -> prompt-following scores.
demo: venv
	$(PY) tools/demo.py --out runs/demo

# The whole suite: fast unit tests plus the slow end-to-end tests, on two pytest workers (each test file on
# one worker: module fixtures such as the Slurm cluster are built once), handed out in the order that
# tests/conftest.py sorts them (longest first), not by number of tests.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# Single-process unit tests only (under 3 minutes): no end-to-end programs, no multi-rank runs; two workers.
test-fast: venv
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not multirank" tests

# One GPU check and benchmark on one H100/H200 (at most 8 minutes): tests/gpu, attention TFLOP/s per backend,
# training-step and inference MFU of the 4.5B widths, peak memory against the planner; JSON + markdown in
# GPU_BENCH_OUT (tools/gpu_bench.py; --dry-run checks the script on a CPU).
GPU_BENCH_OUT ?= outputs/gpu_bench
gpu-bench: venv
	$(PY) tools/gpu_bench.py --out $(GPU_BENCH_OUT)

clean:
	rm -rf $(VENV) outputs runs wandb .pytest_cache
