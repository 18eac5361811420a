# Set-up is part of every target: the virtual environment is created on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test test-fast bench bench-cache bench-data bench-train clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

## default training run (offline, embedded digits data set); extra overrides: make train ARGS="model=vgg16"
train: $(STAMP)
	$(PY) -m lightning_project.train $(ARGS)

## the whole test suite, slow end-to-end tests included
test: $(STAMP)
	$(PY) -m pytest $(ARGS)

## the quick part only (unit tests, no end-to-end runs)
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

## benchmarks, ratios measured in one process; figures go to benchmarks/RESULTS.md and benchmarks/results/;
## options shared by both: make bench ARGS="--device cuda --image-size 224 --batch-size 128 --model resnet50"
bench: bench-cache bench-data bench-train

## frozen-backbone feature cache against uncached training (ResNet-18, 64 px, CPU by default)
bench-cache: $(STAMP)
	$(PY) benchmarks/feature_cache.py $(ARGS)

## the training loader alone against the model's consumption: which one is the bottleneck (224 px)
bench-data: $(STAMP)
	$(PY) benchmarks/data_pipeline.py --write-results $(ARGS)

## the training step through lightning_project against a plain PyTorch loop, and the cost of
## trainer.deterministic=true and trainer.benchmark=false (ResNet-18, 32 px on CPU; --device cuda: ResNet-50, 224 px)
bench-train: $(STAMP)
	$(PY) benchmarks/train_step.py --write-results $(ARGS)

clean:
	rm -rf logs .pytest_cache
