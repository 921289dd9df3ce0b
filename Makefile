# Two commands set everything up on a fresh machine with Python 3.10+:
#   make demo   install, then run the Starlette example on the SQLite store
#   make test   install, then run ruff, mypy, every test and the docs build
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint docs docs-check bench bench-flood bench-peers fuzz durability clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@
	@echo "Installed. The CLI is $(BIN)/keyguard (or run '. $(BIN)/activate' first, then 'keyguard')."

demo: install
	$(BIN)/python examples/starlette_app.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint docs-check
	$(BIN)/pytest --cov --cov-report=term

# Not -q: mkdocs counts warnings only when it shows them, and --strict fails on any.
docs-check: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .site-check
	rm -rf .site-check

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q tests/test_fuzz.py

# 30 SIGKILL rounds per store; the normal run makes 5. -s shows each store's figures.
durability: install
	KEYGUARD_DURABILITY_ROUNDS=30 $(BIN)/pytest -q -s tests/test_durability.py

# Every benchmark, one after another: 10 to 30 minutes on a 2-core machine. Each prints its
# figures beside a floor timed in the same loop; those that need Redis or PostgreSQL
# (KEYGUARD_TEST_REDIS_URL, KEYGUARD_TEST_POSTGRES_DSN) say so and skip them when they do
# not answer. The peers comparison runs in a venv of its own, $(BENCH_VENV), so the
# peers never enter $(VENV).
BENCH_VENV ?= .venv-bench

bench: install $(BENCH_VENV)/.installed
	@echo "make bench: every benchmark, 10 to 30 minutes"
	@echo "date: $$(date -u '+%Y-%m-%d %H:%M UTC')"
	@echo "machine: $$(uname -srm); $$(getconf _NPROCESSORS_ONLN) cores; load: $$(uptime | sed 's/.*load average[s]*: //')"
	@$(BIN)/python -c "import platform; print('python:', platform.python_implementation(), platform.python_version())"
	$(BIN)/python benchmarks/bench_validate.py
	$(BIN)/python benchmarks/bench_middleware.py
	$(BIN)/python benchmarks/bench_records.py
	$(BIN)/python benchmarks/bench_sqlite.py
	$(BIN)/python benchmarks/bench_limits.py
	$(BIN)/python benchmarks/bench_propagation.py
	$(BIN)/python benchmarks/bench_redis.py
	$(BIN)/python benchmarks/bench_postgres.py
	$(BIN)/python benchmarks/bench_flood.py
	$(BENCH_VENV)/bin/python benchmarks/bench_peers.py

# Parts of make bench, alone. 1,000,000 keys in Redis and PostgreSQL, then floods of
# invented keys: several minutes.
bench-flood: install
	$(BIN)/python benchmarks/bench_flood.py

# keyguard beside djangorestframework-api-key, fastapi-keygate and keyshield, on the same
# SQLite file and PostgreSQL server: about 8 minutes.
bench-peers: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/bench_peers.py

$(BENCH_VENV)/.installed: pyproject.toml benchmarks/peers-requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q -r benchmarks/peers-requirements.txt -e '.[all]'
	touch $@

clean:
	rm -rf $(VENV) $(BENCH_VENV) site .site-check .pytest_cache .mypy_cache .ruff_cache .coverage
