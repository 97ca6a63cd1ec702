# The README's two commands. Each sets up what it needs: a .venv with the pinned packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow test-all count gpu-check gpu-check-wheels

$(STAMP): requirements.txt requirements-base.txt requirements-cluster.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: on a CPU machine 2.13.0 is the CPU wheel; a later unpinned
	# dependency must find it already satisfied rather than pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) app.py

# The suite a change is checked with, within about 10 minutes here; CI (.ci/run) runs test-slow too:
# the tests marked slow (trainings of every family, every browser path, the mutation samples).
test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: $(STAMP)
	$(PY) -m pytest

count: $(STAMP)
	$(PY) -m restuning.count --arch sd15

# The accelerator check (bench/gpu_check.py): on a CUDA machine with the packages installed.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check

# For a bare GPU box with PyTorch but no registry: wheels of what it lacks, into .whl/ (see the script).
gpu-check-wheels:
	$(PYTHON) scripts/gpu_wheels.py
