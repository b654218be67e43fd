# avatarflow developer entry points. Everything runs from a local virtualenv that
# this Makefile creates; nothing needs an AWS account, a GPU or Docker.
PYTHON ?= python3
VENV ?= .venv
TOOLS_VENV ?= .venv-tools
CHECKOV_VENV ?= .venv-checkov
OPS_VENV ?= .venv-ops
PY := $(VENV)/bin/python
TOOLS := $(TOOLS_VENV)/bin
ASL_TOOL := tools/asl
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# Two shared cores: torch's default threading is 5-20x slower here.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export SAM_CLI_TELEMETRY ?= 0
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: install tools web web-package browser lock test test-fast lint validate bench-intake bench-train bench-infer bench-gpu bench-queue bench fuzz soak demo up clean

# The CPU build of torch (lock/dev.txt pins 2.13.0+cpu) is not on PyPI. Where pip has no
# find-links folder configured that holds it, take it from PyTorch's CPU index.
PIP_FIND_LINKS_CONFIGURED := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
TORCH_INDEX ?= $(if $(PIP_FIND_LINKS_CONFIGURED)$(PIP_FIND_LINKS),,https://download.pytorch.org/whl/cpu)
# Installs only what a lock file names, each file checked against its hash; --no-deps: pip
# never resolves (a missing dependency is an error of the lock, found by the check after).
PIP_FROM_LOCK = -m pip install -q --require-hashes --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

install: $(VENV)/.installed

$(VENV)/.installed: lock/dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "lock/dev.txt is for Python 3.11: make PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_FROM_LOCK) -r lock/dev.txt
	@# The project itself: its source on the path (no build step, nothing to resolve).
	$(PY) -c 'import sysconfig, pathlib; pathlib.Path(sysconfig.get_path("purelib"), "avatarflow.pth").write_text("$(CURDIR)/src\n")'
	$(PY) scripts/lock.py --check-installed dev
	touch $@

# Linters that pin their own versions of shared libraries live apart from the runtime deps.
tools: $(TOOLS_VENV)/.installed $(CHECKOV_VENV)/.installed $(OPS_VENV)/.installed $(ASL_TOOL)/node_modules/.installed

$(TOOLS_VENV)/.installed: lock/tools.txt
	test -x $(TOOLS)/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS)/python $(PIP_FROM_LOCK) -r lock/tools.txt
	$(PYTHON) scripts/lock.py --check-installed tools --python $(TOOLS)/python
	touch $@

# checkov conflicts with aws-sam-cli in one venv (boto3/pydantic pins): a venv of its own.
$(CHECKOV_VENV)/.installed: lock/checkov.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python $(PIP_FROM_LOCK) -r lock/checkov.txt
	$(PYTHON) scripts/lock.py --check-installed checkov --python $(CHECKOV_VENV)/bin/python
	touch $@

# The operator CLI (python -m avatarflow_ops): sagemaker-core pins importlib-metadata<7 and
# rich<15, older than the dev venv's, so it gets a venv of its own; tests/test_ops_cli.py runs it.
$(OPS_VENV)/.installed: lock/ops.txt
	test -x $(OPS_VENV)/bin/python || $(PYTHON) -m venv $(OPS_VENV)
	$(OPS_VENV)/bin/python $(PIP_FROM_LOCK) -r lock/ops.txt
	$(PYTHON) scripts/lock.py --check-installed ops --python $(OPS_VENV)/bin/python
	touch $@

# AWS's Amazon States Language service (npm amazon-states-language-service, what the AWS
# Toolkit validates with) for tests/test_asl_rules.py. `npm ci` installs exactly
# package-lock.json (integrity hashes) and fails when it disagrees with package.json; no
# install scripts run. Node and npm come from Debian's packages where they are missing.
$(ASL_TOOL)/node_modules/.installed: $(ASL_TOOL)/package.json $(ASL_TOOL)/package-lock.json
	command -v node >/dev/null && command -v npm >/dev/null || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends nodejs npm)
	cd $(ASL_TOOL) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

# The web app (web/: Vite + TypeScript, axe-core for the browser test): `npm ci` installs exactly
# web/package-lock.json (integrity hashes, no install scripts), then a type check and the build
# into web/dist. Nothing is fetched when the app runs.
WEB_SOURCES := $(wildcard web/src/*) $(wildcard web/public/*) web/index.html web/vite.config.ts web/tsconfig.json
web: web/dist/index.html

web/node_modules/.installed: web/package.json web/package-lock.json
	command -v node >/dev/null && command -v npm >/dev/null || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends nodejs npm)
	cd web && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

web/dist/index.html: web/node_modules/.installed $(WEB_SOURCES)
	cd web && npm run build

# Before `sam build`: the built app goes inside the publisher function's package
# (functions/publish_web/site/, git-ignored), which copies it to the app bucket at deploy time.
web-package: web
	rm -rf functions/publish_web/site
	cp -R web/dist functions/publish_web/site

# Headless Chromium from Debian's packages for tests/test_web_app.py (Playwright drives it by
# path: no browser download). Installed where missing, as node/npm are for tools/asl.
browser:
	command -v chromium >/dev/null || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium)

# Refresh every lock/*.txt on purpose (newest versions pyproject's ranges and lock/*.in allow),
# then src/requirements.txt from lock/layer.txt. A refresh must pass `make test` like any change.
# LOCK_ARGS=--keep re-resolves after an input changed without upgrading the rest.
lock: $(TOOLS_VENV)/.installed
	$(PYTHON) scripts/lock.py --uv $(TOOLS)/uv $(LOCK_ARGS)

lint: install
	$(PY) -m ruff check .

# Everything, what CI runs. Three pytest workers on the two cores: the end-to-end tests spend
# much of their time waiting (settle timers, pollers, a training subprocess starting), and a
# third worker fills that idle time (measured: 262 s vs 283 s with two).
test: install tools lint web browser
	PATH="$(CURDIR)/$(TOOLS_VENV)/bin:$$PATH" $(PY) -m pytest -n 3 --dist worksteal

# Unit tests only (no training subprocess, no workflow run): the inner loop, under a minute.
test-fast: install
	$(PY) -m pytest -m "not e2e" -n 2 --dist worksteal

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

# The training queue at scale (bench/bench_queue.py, docs/benchmarks.md#training-queue): 200
# batches from 50 users against a limit of 4 through the real state machine with stand-in jobs,
# then the on-paper projection for 10,000 batches a day. BENCH_QUEUE_ARGS: see --help.
bench-queue: install
	$(PY) bench/bench_queue.py $(BENCH_QUEUE_ARGS)

bench-infer: install
	$(PY) bench/bench_infer.py

# The GPU measurements (bench/bench_gpu.py, docs/benchmarks.md): on a CUDA machine with torch,
# no network; BENCH_GPU_WHEELS=<dir> installs the other dependencies from wheels first (made
# elsewhere with `python bench/bench_gpu.py --fetch-wheels <dir>`). Writes out/bench_gpu.json.
BENCH_PYTHON ?= python3
bench-gpu:
	mkdir -p out
	$(BENCH_PYTHON) bench/bench_gpu.py --json out/bench_gpu.json $(if $(BENCH_GPU_WHEELS),--wheels $(BENCH_GPU_WHEELS)) $(BENCH_GPU_ARGS)

# The whole system on 127.0.0.1 (moto + in-process handlers + tiny model): see README.
# PHOTOS=<folder> uses your photos; DEMO_ARGS / UP_ARGS pass more flags (--base-model PATH, --steps N).
demo: install
	$(PY) -m avatarflow_local demo $(if $(PHOTOS),--photos "$(PHOTOS)") $(DEMO_ARGS)

up: install web
	$(PY) -m avatarflow_local up $(UP_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(CHECKOV_VENV) $(ASL_TOOL)/node_modules web/node_modules web/dist \
		functions/publish_web/site .pytest_cache .ruff_cache out
