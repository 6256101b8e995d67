# soce: `make test` and `make run` each set everything up on first use (venv + pinned install).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.soce-installed
BFCL_STAMP := $(VENV)/.soce-bfcl-installed
# offline by default: the demo needs no hub; telemetry off
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test run smoke ui bench lint clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

test: $(STAMP) $(BFCL_STAMP) browser  ## run the test suite (CPU; real lm-eval, MLflow, safetensors, bfcl-eval, Chromium)
	$(PY) -m pytest -q

# The MLflow UI browser test (tests/test_ui_browser.py): Playwright (requirements.txt) drives Debian's Chromium
# (never a downloaded browser). Installed here when missing and apt-get can (root, or sudo); else the test skips,
# except in CI (.ci/run sets SOCE_REQUIRE_BROWSER=1: it fails).
CHROMIUM ?= /usr/bin/chromium
.PHONY: browser
browser:  ## install Debian's Chromium for the browser test, when missing and possible
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; } || \
	  echo "make browser: cannot install chromium here; tests/test_ui_browser.py will skip"; }

# BFCL v3 backend (benchmark=bfcl_v3): bfcl-eval 2025.6.15 without its pins (numpy 1, every vendor SDK) and the
# few modules its checker imports; soce.benchmarks.bfcl_sdk stands in for the SDKs (see requirements-bfcl.txt)
.PHONY: bfcl
bfcl: $(BFCL_STAMP)  ## install the BFCL v3 backend into the venv
$(BFCL_STAMP): $(STAMP) requirements-bfcl.txt
	$(PY) -m pip install -q --no-deps -r requirements-bfcl.txt
	@touch $(BFCL_STAMP)

run: $(STAMP)  ## the main job: uniform / soce_selected / soce_weighted on the demo, then the comparison table
	$(PY) -m soce -m strategy=uniform,soce_selected,soce_weighted $(ARGS)
	$(PY) -m soce.report

smoke: $(STAMP)  ## the same sweep on the fast demo zoo (debug=fast): under 2 min on 2 cores, zoo build included
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m soce -m strategy=uniform,soce_selected,soce_weighted debug=fast $(ARGS)
	$(PY) -m soce.report

UI_PORT ?= 5000
ui: $(STAMP)  ## MLflow UI on the project's store; prints the addresses that open the latest sweep's views
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)/ (click 'Model training' at the top once: MLflow 3.17 opens its GenAI screens by default)"
	@$(PY) -m soce.report url root=$(CURDIR) base=http://127.0.0.1:$(UI_PORT) || true
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db --host 127.0.0.1 \
		--port $(UI_PORT) --workers 1

bench: $(STAMP)  ## merge-engine benchmark against mergekit (bench-only venv)
	bash bench/run.sh

lint: $(STAMP)  ## ruff: lint and format checks (ruff format soce tests bench fixes the latter)
	$(VENV)/bin/ruff check soce tests bench
	$(VENV)/bin/ruff format --check soce tests bench

clean:  ## remove run outputs (keeps the venv)
	rm -rf outputs
