# Set-up and entry points. Both `make demo` and `make test` create .venv/ on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned: 2.13.0 resolves to the CPU wheel; a looser spec would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,faces,serve,ray]"
	# MTCNN weights ship inside this wheel; its old pins do not apply since cervl never imports it.
	$(BIN)/python -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cervl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/synth_rate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
