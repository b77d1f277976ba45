# Two entry points, each creates/refreshes .venv from the project's own files first:
#   make demo   segment a few coco-mini images and write overlays + a report to out/demo
#   make test   lint (ruff) + the default test suite (parity against the reference packages)
# More: make test-slow, make lint, make bench.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
DATA   ?= ../shared/data
# The CPU wheel of torch; a GPU user sets TORCH_SPEC to their CUDA build (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow lint format bench eval-baselines venv clean

venv: $(STAMP)

# Refreshes whenever the project's own dependency files change.
$(STAMP): pyproject.toml requirements-test.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@# Reference packages for parity tests: --no-deps, or pip would swap torch for a CUDA build.
	$(PY) -m pip install --quiet --no-deps -r requirements-test.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/leansam demo --data $(DATA)/coco-mini --out out/demo $(DEMO_ARGS)

test: $(STAMP) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/encoder_latency.py --runs 15 --out benchmarks/results/encoder_latency.json

# The baseline rows of EVALUATION.md on coco-mini val (about 30 minutes on 2 cores).
EVAL_ARGS = --images $(DATA)/coco-mini/val2017 \
	--annotations $(DATA)/coco-mini/annotations/instances_val2017.json --no-progress
eval-baselines: $(STAMP)
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model box-fill --protocol box --out out/eval/box-fill-box
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model box-fill --protocol detector --detections gt \
		--out out/eval/box-fill-det
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model grabcut --protocol box --out out/eval/grabcut-box
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model grabcut --protocol click --clicks 1,3,5 \
		--out out/eval/grabcut-click
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model grabcut --protocol detector --detections gt \
		--out out/eval/grabcut-det

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
