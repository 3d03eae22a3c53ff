# Two entry points for a newcomer:  `make demo`  and  `make test`.
# Both create .venv on first use; `make demo` runs synthetic data -> shards -> training -> evaluation.

VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
DEMO   ?= runs/demo
# The demo trains with 2 CPU processes (gloo DDP) unless a GPU is present.
LAUNCH ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; \
            then echo launch/one-gpu.yaml; else echo launch/cpu-2proc.yaml; fi)

.PHONY: setup demo test lint clean-demo gpu-check serve

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# synth runs once: a second `make demo` reuses the images (synth refuses to write into a non-empty folder).
data/synthetic/HAM10000_metadata.csv: | setup
	$(BIN)/skinlesion synth data/synthetic --images 2000 --seed 0

demo: setup data/synthetic/HAM10000_metadata.csv
	$(BIN)/skinlesion prepare --metadata data/synthetic/HAM10000_metadata.csv \
	    --images data/synthetic/HAM10000_images_part_1 --images data/synthetic/HAM10000_images_part_2 \
	    --out shards --image-size 72 --samples-per-class 150 --min-shards 8 --overwrite
	$(BIN)/accelerate launch --config_file $(LAUNCH) -m skinlesion train --config configs/smoke.yaml \
	    train.output_dir=$(DEMO)

# The dermatologist's page for the demo model: http://127.0.0.1:8000/ (after `make demo`).
serve: setup
	$(BIN)/skinlesion serve --checkpoint $(DEMO)/best.pt

# Test files run on TEST_WORKERS pytest-xdist workers, a file per worker at a time (module fixtures built once):
# much of the suite waits on subprocesses and SLURM jobs, so on 2 cores 3 workers took 10 min 16 s, 2 took 11 min
# 0 s (back to back, 636 tests) and one process 16.5 min.
TEST_WORKERS ?= 3
test: setup
	$(BIN)/ruff check skinlesion tests
	$(BIN)/ruff format --check skinlesion tests
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check skinlesion tests
	$(BIN)/ruff format --check skinlesion tests

# The one-call GPU check (benchmarks/gpu-check.sh): bench step / loader / train and a 2-epoch run on this machine's
# GPU; `benchmarks/gpu-check.sh --cpu DIR` is the scaled-down CPU version that CI runs.
gpu-check:
	benchmarks/gpu-check.sh runs/gpu-check
