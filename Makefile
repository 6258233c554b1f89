# `make demo` and `make test` set everything up by themselves: a virtual environment in
# .venv, torch + torchvision, the other dependencies, and tunecomp built in place.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunecomp-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test info clean

demo: $(STAMP)
	$(PY) -m tunecomp demo

test: $(STAMP)
	$(PY) -m pytest

info: $(STAMP)
	$(PY) -m tunecomp info

# Rebuilt whenever the build files or the native sources change.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel ninja
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf build *.egg-info tunecomp/_C*.so
