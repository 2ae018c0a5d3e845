# lmx — the two set-up commands (see README):
#   make serve   install into .venv and run the daemon on 127.0.0.1:1234 with the built-in model
#   make test    install into .venv (with dev tools) and run lint, types, layers and the tests
# BACKEND picks MLX's backend on Linux: cpu (default) or cuda. macOS always uses Metal.

PYTHON ?= python3
VENV ?= .venv
BACKEND ?= cpu
PY := $(VENV)/bin/python
UNAME := $(shell uname -s)
ifeq ($(UNAME),Darwin)
  RUN_SPEC := .
  DEV_SPEC := .[dev,bench]
else
  RUN_SPEC := .[$(BACKEND)]
  DEV_SPEC := .[$(BACKEND),dev,bench]
endif

.PHONY: serve test lint bench clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lmx needs Python >= 3.11; set PYTHON=python3.12 (or similar)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-$(BACKEND): pyproject.toml | $(PY)
	@# mlx-cpu and mlx-cuda-13 both ship mlx/lib/libmlx.so: when switching, remove both (either
	@# one's uninstall deletes the shared file) so that the chosen backend installs cleanly.
	@other=$$([ "$(BACKEND)" = cuda ] && echo mlx-cpu || echo mlx-cuda-13); \
	if $(PY) -m pip show -q $$other >/dev/null 2>&1; then \
		$(PY) -m pip uninstall --quiet -y mlx-cpu mlx-cuda-13; fi
	$(PY) -m pip install --quiet -e "$(RUN_SPEC)"
	@rm -f $(VENV)/.installed-*
	@touch $@

$(VENV)/.dev-$(BACKEND): $(VENV)/.installed-$(BACKEND)
	$(PY) -m pip install --quiet -e "$(DEV_SPEC)"
	@rm -f $(VENV)/.dev-*
	@touch $@

serve: $(VENV)/.installed-$(BACKEND)
	$(VENV)/bin/lmx serve

lint: $(VENV)/.dev-$(BACKEND)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest -q

bench: $(VENV)/.dev-$(BACKEND)
	$(PY) -m bench.run_throughput --preset tiny --out bench/results/
	$(PY) -m bench.bench_plan

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
