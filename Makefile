# Two entry points (README quick start); each sets itself up on a fresh machine.
#   make demo   - the main job: PromptedCLIP ViT-B/16 summary, parity, training steps
#   make test   - the CPU test suite (what CI runs)
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)
# torch is pinned to the CUDA build that lies on local disk (pip's constraint caps it);
# torchaudio 2.11 declares no torch pin and installs beside it.
# The CUDA extension is not built at install (nvcc may exist without a GPU); on a GPU
# machine it is JIT-built on first use, or `make setup AVSTFP_NO_CUDA=0` builds it now.
AVSTFP_NO_CUDA ?= 1
TORCH   := torch==2.14.1 torchvision==0.29.1 "torchaudio==2.11.*"

.PHONY: demo test test-all setup clean

$(STAMP):
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q $(TORCH)
	AVSTFP_NO_CUDA=$(AVSTFP_NO_CUDA) $(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VPY) -m avstfp_fast.demo

# CPU suite: the compile-time sm_90 contract of the Triton and CUDA kernels (CI subset),
# the byte and launch ledger of every stage call (bench/ledger.py --ci: fails on a row
# over its bounds; the cuda backend's rows too),
# unit tests (Triton kernels under the interpreter without a GPU: tests/conftest.py sets
# TRITON_INTERPRET=1; CUDA kernels under emulation), and
# every CPU benchmark case run once at tiny size (benchmarks are not timed here).
# Each test's inputs come from a seed derived from its node id and AVSTFP_TEST_SEED
# (fresh for every run, printed first and in the report of a failing test; set it to
# replay a run).
ifndef AVSTFP_TEST_SEED
AVSTFP_TEST_SEED := $(shell od -An -N2 -tu2 /dev/urandom | tr -d ' ')
endif
export AVSTFP_TEST_SEED

test: $(STAMP)
	@echo "AVSTFP_TEST_SEED=$(AVSTFP_TEST_SEED)"
	$(VPY) bench/static_sm90.py --ci
	$(VPY) bench/ledger.py --ci
	$(VPY) bench/ledger.py --ci --backend cuda
	$(VPY) -m pytest -q -m "not slow" tests
	AVSTFP_BENCH_SIZE=tiny $(VPY) -m pytest -q bench --benchmark-disable

test-all: $(STAMP)
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
