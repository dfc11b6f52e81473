# Two commands matter: `make demo` (the main job) and `make test`. Both create and use
# the virtual environment in .venv/ with the pinned stack (see README "Installation").
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.cdd-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml requirements/base.txt
	python3 -m venv $(VENV)
	$(PIP) install -q -r requirements/base.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) install -q --no-deps fastreid==1.4.0 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cdd demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_rggr.py

clean:
	rm -rf $(VENV) runs work_dirs .pytest_cache
