# fooproxy: every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export FOO_BIN_DIR ?= bin
export GEVENT_MONITOR_THREAD_ENABLE ?= 1

.PHONY: install test test-pure unit integration e2e load bench demo lint tox fuzz clean

$(STAMP): setup.py fooproxy/_flow.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test,load,lint,hosts,fuzz]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install fooproxy with everything make test, load and lint need

test: $(STAMP)  ## every test that finishes in a few minutes (CI runs this)
	$(BIN)/pytest tests

test-pure: $(STAMP)  ## the same tests on the pure-Python hot path (FOOPROXY_PURE=1: no fooproxy._flow)
	FOOPROXY_PURE=1 $(BIN)/pytest tests

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

e2e: $(STAMP)  ## end to end through the installed CLIs (reference binaries if FOO_BIN_DIR has them)
	$(BIN)/pytest tests/e2e

load: $(STAMP)  ## locust swarm through fooproxy, stats side by side
	$(BIN)/foo-harness swarm $(LOAD_ARGS)

bench: $(STAMP)  ## direct vs HAProxy vs fooproxy benchmark table (BENCH_ARGS="--rounds 3", "--no-haproxy", ...)
	$(BIN)/foo-harness bench $(BENCH_ARGS)

demo: $(STAMP)  ## the whole product in one command
	$(BIN)/foo-harness demo

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := counter recovery
fuzz: $(STAMP)  ## atheris: each fuzz/fuzz_<target>.py for FUZZ_SECONDS, new inputs in .fuzz/<target>, crashes in .fuzz/
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/pip install -e '.[test,fuzz]'
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p .fuzz/$$t; \
		echo "fuzz $$t for $(FUZZ_SECONDS) s"; \
		$(BIN)/python fuzz/fuzz_$$t.py .fuzz/$$t fuzz/corpus/$$t -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=.fuzz/$$t- -print_final_stats=1 $(FUZZ_ARGS) || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

tox: $(STAMP)  ## the tox matrix (TOX_ARGS="-e py312-gevent-min" for one env); pyenv's 3.11-3.13 made visible
	$(BIN)/pip install 'tox>=4.11,<5'
	PYENV_VERSION=$${PYENV_VERSION:-3.11:3.12:3.13} $(BIN)/tox $(TOX_ARGS)

clean:
	rm -rf $(VENV) .tox build *.egg-info .pytest_cache .ruff_cache .fuzz
