# The two commands of the README: `make run` and `make test`. Both create the
# venv on first use and reuse it (and the embedded database) afterwards.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GPUCTL := $(BIN)/gpuctl

.PHONY: run test lint venv db-stop clean-db bench vendor-chartjs translations

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (found %d.%d); set PYTHON=/path/to/python3.11" % sys.version_info[:2])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# The gpuctl CLI (one stdlib-only file) as a command in the venv: .venv/bin/gpuctl
$(GPUCTL): $(STAMP) cli/gpuctl.py
	printf '#!/bin/sh\nexec "%s/$(BIN)/python" "%s/cli/gpuctl.py" "$$@"\n' "$(CURDIR)" "$(CURDIR)" > $@
	chmod +x $@

# English and Chinese: the committed .po files compiled to .mo (polib; no gettext tools needed).
translations: $(STAMP)
	$(BIN)/python -m portal.i18n

venv: $(STAMP) $(GPUCTL) translations

run: $(STAMP) $(GPUCTL) translations
	$(BIN)/python manage.py devrun

test: $(STAMP) $(GPUCTL) translations
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache  # the apps' layers (pyproject.toml [tool.importlinter])
	$(BIN)/python manage.py makemigrations --check --dry-run > /dev/null || (echo "missing migrations: run manage.py makemigrations"; exit 1)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

# Chart.js is vendored (portal/static/vendor/chartjs/, committed; served from our static
# files, never a CDN). Maintainers refresh it from the npm registry with this target.
CHARTJS_VERSION ?= 4.6.1
vendor-chartjs:
	rm -rf var/npm && mkdir -p var/npm && cd var/npm && npm pack --silent chart.js@$(CHARTJS_VERSION) && tar xzf chart.js-$(CHARTJS_VERSION).tgz
	cp var/npm/package/dist/chart.umd.min.js var/npm/package/LICENSE.md portal/static/vendor/chartjs/
	sed -i '1s/.*/chart.js $(CHARTJS_VERSION) from the npm registry (dist\/chart.umd.min.js and LICENSE.md, MIT), unmodified./' portal/static/vendor/chartjs/VERSION

db-stop: $(STAMP)
	$(BIN)/python -m portal.embedded_db stop

clean-db: db-stop
	rm -rf var/pg
