# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvfleet-installed
NATIVE := $(VENV)/.kvfleet-native

.PHONY: install demo test test-fast deploy-check bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any other spec may pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[replica,loadgen,dev,dashboards,picker,k8s,deploy]'
	touch $(STAMP)

# The C extensions (protocol/_hashchain.c, balancer/_blocktable.c, kernels/_cpu_decode.c) are
# rebuilt when their sources change. Optional: without a compiler the build fails quietly and the
# pure-Python / torch paths are used (protocol.hashing.NATIVE, balancer.prefix_index.NATIVE_TABLE,
# kernels.cpu_decode.NATIVE say which).
$(NATIVE): $(STAMP) setup.py protocol/_hashchain.c balancer/_blocktable.c kernels/_cpu_decode.c
	$(PY) setup.py -q build_ext --inplace || echo "C extensions not built: using the pure-Python and torch paths"
	touch $(NATIVE)

install: $(STAMP) $(NATIVE)

demo: install
	$(VENV)/bin/kvfleet demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The Helm chart (deploy/helm/kvfleet): helm lint --strict, render, schema-check every manifest.
deploy-check: install
	$(PY) deploy/check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
