# The two commands of the README. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test clean

run: $(VENV)/.installed  ## run the embedded default (digits, 20 clients, FML)
	$(BIN)/fmlray run

# Two pytest workers: 13-30 % of a worker's time is waiting (Ray and its agents starting, polls), which the
# other worker fills. Each worker has its own Ray; tests sharing a module fixture (a Ray head, a cluster) stay together.
test: $(VENV)/.installed  ## the whole test suite (unit + Ray integration)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) runs
