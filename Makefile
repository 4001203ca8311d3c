# Every target creates .venv when missing. TORCH picks the torch requirement
# (CI uses the local CPU build: make test TORCH=torch==2.13.0).
TORCH ?= torch
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo compare test test-all bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cli.demo --out demo-out

compare: $(STAMP)
	$(PY) -m cli.demo --compare --out compare-out

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) -m bench.run_all --out BENCHMARKS.md

clean:
	rm -rf .venv demo-out compare-out .pytest_cache
