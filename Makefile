# The two commands: `make run` and `make test`. See README.md.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check bench clean

run: $(STAMP)
	$(VENV)/bin/sinkhole serve -c sinkhole.example.yaml

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	  else echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"; exit 1; fi; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,sidecar]'
	touch $(STAMP)

test: $(STAMP)
	sh tests/install-debian-deps.sh
	$(PY) -m pytest -q

check: $(STAMP)
	$(VENV)/bin/sinkhole check --strict blocklists

bench: $(STAMP)
	sh bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
