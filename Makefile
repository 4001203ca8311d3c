# Every target creates .venv when missing. TORCH is the torch requirement pip installs first;
# TORCH_INDEX, when set, is the package index torch comes from (e.g. PyTorch's CPU-only index).
# The stamp is per TORCH value, so `make test TORCH=...` after a first install re-installs torch.
# CI: make test TORCH=torch==2.13.0 (the CPU build this project's machines hold locally).
TORCH ?= torch
TORCH_INDEX ?=
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell printf '%s' '$(TORCH) $(TORCH_INDEX)' | tr -c 'A-Za-z0-9.' '_')
LINTED := avprep ogmge_train cli tests bench

.PHONY: demo demo-quick compare test test-all test-slow lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install -q -e ".[test]"
	rm -f .venv/.installed-*
	touch $@

install: $(STAMP)

# OGMGE_COMMAND: the command the user typed, named by the Ctrl-C hint
demo: $(STAMP)
	OGMGE_COMMAND="make demo" $(PY) -m cli.demo --out demo-out

LINT = $(PY) -m ruff check $(LINTED) && $(PY) -m mypy

# the same task, protocol and report on 4 arms x 3 seeds and 512 test clips: a preview, not powered
demo-quick: $(STAMP)
	OGMGE_COMMAND="make demo-quick" $(PY) -m cli.demo --quick --out demo-quick-out

lint: $(STAMP)
	$(LINT)

compare: $(STAMP)
	OGMGE_COMMAND="make compare" $(PY) -m cli.demo --compare --out compare-out

# Both say how long they took (lint included), so a slow or loaded machine is visible; make test
# also lists its 15 slowest tests (no default test should take more than about a minute of CPU).
# make test runs on PYTEST_WORKERS processes (pytest-xdist; "auto" = one per core, at most 4;
# 0 = in this process). xdist hands each worker tests in collection order, so a README block
# can first replay the earlier blocks its worker has not run (tests/test_readme.py). The slow
# suite stays serial (it measures memory).
PYTEST_WORKERS ?= auto
TIMED = start=$$(date +%s); $(1); rc=$$?; s=$$(( $$(date +%s) - start )); \
	echo "make $@: $$(( s / 60 )) min $$(( s % 60 )) s (exit $$rc)"; exit $$rc

test: $(STAMP)
	@$(call TIMED,$(LINT) && $(PY) -m pytest -q -n $(PYTEST_WORKERS) --maxprocesses 4 --durations=15)

test-all: $(STAMP)
	@$(call TIMED,$(LINT) && $(PY) -m pytest -q -m "slow or not slow" --durations=15)

test-slow: $(STAMP)
	@$(call TIMED,$(PY) -m pytest -q -m slow --durations=15)

bench: $(STAMP)
	$(PY) -m bench.run_all --out BENCHMARKS.md

clean:
	rm -rf .venv demo-out demo-quick-out compare-out .pytest_cache .mypy_cache .ruff_cache
