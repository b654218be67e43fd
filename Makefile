# avatarflow developer entry points. Everything runs from a local virtualenv that
# this Makefile creates; nothing needs an AWS account, a GPU or Docker.
PYTHON ?= python3
VENV ?= .venv
TOOLS_VENV ?= .venv-tools
CHECKOV_VENV ?= .venv-checkov
PY := $(VENV)/bin/python
TOOLS := $(TOOLS_VENV)/bin

# Two shared cores: torch's default threading is 5-20x slower here.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export SAM_CLI_TELEMETRY ?= 0
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: install tools test lint validate bench-intake bench-train bench-infer bench fuzz soak demo up clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[faces,ml,dev]'
	touch $@

# Linters that pin their own versions of shared libraries live apart from the runtime deps.
tools: $(TOOLS_VENV)/.installed $(CHECKOV_VENV)/.installed

$(TOOLS_VENV)/.installed: requirements-tools.txt
	test -x $(TOOLS)/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS)/python -m pip install -q --upgrade pip
	$(TOOLS)/python -m pip install -q -r requirements-tools.txt
	touch $@

# checkov conflicts with aws-sam-cli in one venv (boto3/pydantic pins): a venv of its own.
$(CHECKOV_VENV)/.installed: requirements-checkov.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install -q -r requirements-checkov.txt
	touch $@

lint: install
	$(PY) -m ruff check .

test: install tools lint
	PATH="$(CURDIR)/$(TOOLS_VENV)/bin:$$PATH" $(PY) -m pytest

# Property fuzzing with a large budget (tests/test_fuzz.py, 10,000 examples per target).
fuzz: install
	$(PY) bench/fuzz.py --examples $${FUZZ_EXAMPLES:-10000}

# Load on 127.0.0.1: the local runtime, one trained model, N clients on the generate and
# status routes; bounded in time and count (docs/benchmarks.md#soak). SOAK_ARGS: --clients, --seconds.
soak: install
	$(PY) bench/soak.py $(SOAK_ARGS)

bench-intake: install
	$(PY) bench/bench_intake.py

bench-train: install
	$(PY) bench/bench_train.py

bench-infer: install
	$(PY) bench/bench_infer.py

# The whole system on 127.0.0.1 (moto + in-process handlers + tiny model): see README.
# PHOTOS=<folder> uses your photos; DEMO_ARGS / UP_ARGS pass more flags (--base-model PATH, --steps N).
demo: install
	$(PY) -m avatarflow_local demo $(if $(PHOTOS),--photos "$(PHOTOS)") $(DEMO_ARGS)

up: install
	$(PY) -m avatarflow_local up $(UP_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(CHECKOV_VENV) .pytest_cache .ruff_cache out
