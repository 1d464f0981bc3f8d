# Superset targets (included by the top-level Makefile). Superset has its own environment.
SUPERSET_VENV := .venv-superset
