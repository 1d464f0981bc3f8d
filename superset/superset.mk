# Superset targets (included by the top-level Makefile). Superset has its own environment.
SUPERSET_VENV := .venv-superset

.PHONY: superset-install superset-bootstrap superset-up browser-install

superset-install: $(SUPERSET_VENV)/.installed ## build Superset's own environment from its pins (idempotent)

# uv comes from the pipeline environment.
$(SUPERSET_VENV)/.installed: superset/requirements.txt superset/requirements.lock $(VENV)/.installed
	test -x $(SUPERSET_VENV)/bin/python || $(PYTHON) -m venv $(SUPERSET_VENV)
	$(VENV)/bin/uv pip install --quiet --python $(SUPERSET_VENV)/bin/python \
	  -r superset/requirements.txt -c superset/requirements.lock
	touch $@

superset-bootstrap: superset-install ## migrate Superset's DB, create roles and users, import the dashboards
	$(ENV) $(SUPERSET_VENV)/bin/python superset/bootstrap.py

superset-up: superset-bootstrap ## bootstrap, then start Superset on 127.0.0.1:$TRAFFICWATCH_SUPERSET_PORT
	$(ENV) $(TW) service start superset

browser-install: ## Debian's headless Chromium for the dashboard tests (only when missing)
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  (apt-get update && apt-get install -y chromium chromium-driver)
