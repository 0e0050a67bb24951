# Everything a fresh machine needs: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MAIN_JOB := examples/grpo_reverse.yaml

.PHONY: setup run test lint redis clean helm-golden helm-apiserver

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# An unpinned torch would pull GBs of CUDA wheels: take the CPU build first when none is present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# The main job: GRPO on a local Ray cluster; outputs (metrics, curve, checkpoints, model) in outputs/grpo-reverse.
run: $(STAMP)
	$(VENV)/bin/raylane train $(MAIN_JOB)

lint: $(STAMP)
	$(VENV)/bin/ruff check raylane tests examples benchmarks
	$(VENV)/bin/ruff format --check raylane tests examples benchmarks
	$(VENV)/bin/lint-imports

test: $(STAMP) redis lint
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

# Rewrite the golden render of the Helm chart's defaults (tests/data/helm/default.yaml); review its diff.
helm-golden: $(STAMP)
	$(PY) tests/test_helm_chart.py

KUBE_APISERVER ?= .kube/bin/kube-apiserver

$(KUBE_APISERVER):
	bash tests/kube/build_kube_apiserver.sh $(dir $(KUBE_APISERVER))

# The chart against a real API server (kube-apiserver 1.20 and etcd, no nodes): KubeRay's CRDs
# installed, every rendered object created; node isolation acting as the chart's ServiceAccount. The
# first run builds the server (~16 min on 2 cores).
helm-apiserver: $(STAMP) $(KUBE_APISERVER)
	RAYLANE_KUBE_APISERVER=$(abspath $(KUBE_APISERVER)) $(PY) -m pytest -q tests/test_helm_apiserver.py tests/test_node_isolation_apiserver.py
