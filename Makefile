# The two commands of the README. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test clean

run: $(VENV)/.installed  ## run the embedded default (digits, 20 clients, FML)
	$(BIN)/fmlray run

# Three pytest workers on two cores: a worker alone waits 13-30 % of its time (Ray and its agents starting,
# polls), which the others fill (2 workers: 882 s, 3: 811 s, on one 2-core machine); a fourth gains nothing
# (on a slower one: 3 workers 1000 s, 4 workers 1020 s, the CPUs 0.6 % idle); the slowest modules go
# first (tests/conftest.py). Each worker has its own Ray; tests sharing a Ray head or cluster stay together.
test: $(VENV)/.installed  ## the whole test suite (unit + Ray integration)
	$(BIN)/python -m pytest -n 3 --dist loadgroup

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) runs
