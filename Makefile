# TrafficWatch: every local run goes through these targets. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
UV_VERSION := 0.13.9
ENV := source scripts/env.sh &&
TW := $(VENV)/bin/trafficwatch
# devtools/: the local feed and the demo's simulated history (`make install` installs it beside the pipeline).
TW_DEV := $(VENV)/bin/trafficwatch-dev
# The demo feed publishes a new simulated snapshot every minute, in real time.
DEMO_FEED_ARGS ?= --interval 60

.PHONY: help install test test-demo screenshots lint demo up down stop status clean-data bench
BENCH_ARGS ?=
# pytest-xdist workers for `make test` (0: one process, no workers). `--dist loadscope`: a module runs whole on one
# worker, so its module fixtures (the end-to-end stack among them) are made once. Two workers ran the suite in 16 min
# instead of 25 on this 2-core machine. One such run failed tests/dashboards/test_trends.py: the `superset` session
# fixture held its settings (TRAFFICWATCH_SERVING_DB, the dashboards' serving file, among them) in os.environ for
# the session, so later modules on that worker (their builds read it) published their marts into that file. Fixed;
# tests/conftest.py now fails any module that leaves a TRAFFICWATCH_/SUPERSET_ variable changed in os.environ.
TEST_WORKERS ?= 2
# A worker that crashes (a segfault in native code) fails its test and ends the run: pytest-xdist 3.8.0 restarting
# it under loadscope re-runs the crashing test and re-queues finished modules as empty units, and the session then
# waits forever (pytest-dev/pytest-xdist#1323, #1378). CI once waited out its 90 minutes that way.
TEST_XDIST = -n $(TEST_WORKERS) --dist loadscope --max-worker-restart=0

# Superset's own environment and bootstrap live beside its configuration.
include superset/superset.mk

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## build the pipeline environment from the pins (idempotent)

$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml devtools/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python -r requirements.txt -c requirements.lock -e . -e devtools
	touch $@

lint: install ## ruff on the code
	$(VENV)/bin/ruff check dags plugins devtools tests superset bench
	$(VENV)/bin/ruff format --check dags plugins devtools tests superset bench

# Tests start their own S3 server, feed and Airflow home on free ports: they never touch .data/.
test: install superset-install browser-install lint ## all tests: unit (moto), integration (real local S3 + feed), DAGs (Airflow)
	rc=0; $(VENV)/bin/python -m pytest $(TEST_XDIST) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-demo: install superset-install browser-install ## the demo's own test: make demo with its history, every chart with data within 10 min (~20 min)
	TRAFFICWATCH_DEMO_TEST=1 $(VENV)/bin/python -m pytest -p no:cacheprovider tests/e2e/test_demo_history.py

screenshots: install superset-install browser-install ## the README's dashboard images (docs/screenshots/), from the demo's test
	TRAFFICWATCH_DEMO_TEST=1 TRAFFICWATCH_SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(VENV)/bin/python -m pytest -p no:cacheprovider tests/e2e/test_demo_history.py

demo: install ## run the whole stack offline against the local feed (simulated Rennes traffic, with DEMO_HISTORY_DAYS of history)
	$(ENV) $(TW) service start s3
	$(ENV) TRAFFICWATCH_FEED_ARGS="$(DEMO_FEED_ARGS)" $(TW) service start feed
	$(ENV) $(TW) service start worker
	$(ENV) TRAFFICWATCH_API_URL=http://127.0.0.1:$$TRAFFICWATCH_FEED_PORT $(MAKE) --no-print-directory _airflow
	@# Offline: the maps on a blank base map unless TRAFFICWATCH_BASE_MAP=osm is set (shell or .env; superset/bootstrap.py).
	$(ENV) TRAFFICWATCH_BASE_MAP=$${TRAFFICWATCH_BASE_MAP:-none} $(MAKE) --no-print-directory superset-up
	@# Simulated history in the background, once the live stack is up (0 days: none); `make status` shows it.
	$(ENV) if [ "$${DEMO_HISTORY_DAYS:-14}" != 0 ]; then $(TW) service start history; fi
	@$(MAKE) --no-print-directory status

up: install ## run the whole stack against the live Rennes API (TRAFFICWATCH_S3=aws: on AWS S3, no local S3)
	$(ENV) if [ "$${TRAFFICWATCH_S3:-local}" = local ]; then $(TW) service start s3; fi
	$(ENV) $(TW) service start worker
	$(ENV) $(MAKE) --no-print-directory _airflow
	$(MAKE) --no-print-directory superset-up
	@$(MAKE) --no-print-directory status

_airflow:
	mkdir -p "$$TRAFFICWATCH_HOME/logs"
	$(VENV)/bin/airflow db migrate > "$$TRAFFICWATCH_HOME/logs/airflow-migrate.log" 2>&1 || \
	  { tail -20 "$$TRAFFICWATCH_HOME/logs/airflow-migrate.log"; exit 1; }
	# Its environment gets the Airflow connections trafficwatch_s3 and trafficwatch_api, made from these settings
	# (AIRFLOW_CONN_* variables already set in the shell or .env are kept): see trafficwatch/connections.py.
	AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False $(TW) service start airflow

bench: install superset-install browser-install ## every benchmark (lake merge, marts build, stack freshness, viewer latency), one report in .data/bench/report.json
	$(ENV) $(VENV)/bin/python bench/report.py $(BENCH_ARGS)

down: ## stop everything `make demo` / `make up` started (every service of $TRAFFICWATCH_HOME, by process group)
	$(ENV) $(TW) down

stop: down ## the same as `make down`
	-$(ENV) $(TW) service stop s3

status: ## what runs, and where; the pipeline's lag (newest landed snapshot vs the serving file, pending merges)
	@$(ENV) for s in s3 feed worker airflow superset; do $(TW) service status $$s || true; done; \
	  echo "Superset:     http://127.0.0.1:$$TRAFFICWATCH_SUPERSET_PORT  (users viewer / operator / admin, passwords in $$TRAFFICWATCH_HOME/secrets.env)"; \
	  echo "Airflow UI:   http://127.0.0.1:$$TRAFFICWATCH_AIRFLOW_PORT  (user admin, password in $$TRAFFICWATCH_HOME/secrets.env)"; \
	  echo "Local S3:     $$AWS_ENDPOINT_URL  bucket $$TRAFFICWATCH_BUCKET"; \
	  echo "Logs:         $$TRAFFICWATCH_HOME/logs/"; \
	  $(TW_DEV) history status || true
	@$(ENV) echo "Pipeline lag: (trafficwatch lag)"; $(TW) lag || true

clean-data: stop ## delete the local data directory (.data/): lake, S3 objects, Airflow DB
	rm -rf .data
