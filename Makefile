# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: venv system-deps demo test test-fast lint bench-local bench-fmnist bench-fmnist-methods bench-speed bench-tune bench-active-learning bench-serve bench-line bench-edge bench-gpu fmnist-data clean

# (Re)install when the package metadata or the pins change. torch is pinned to the CPU wheel through
# constraints.txt: unpinned, pip would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -c 'import torch; assert torch.version.cuda is None, "a CUDA torch was installed"'
	touch $(STAMP)

venv: $(STAMP)

# System packages from Debian: the real data (dataset-fashion-mnist) and the browser the labeling page's tests
# drive (chromium; never `playwright install`, which downloads its own and fails offline). Installed when missing
# and we may use apt; otherwise the tests that need them skip with a message naming the package.
APT_PACKAGES := dataset-fashion-mnist chromium chromium-driver
system-deps:
	@missing=""; [ -d $(FMNIST) ] || missing="dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q --no-install-recommends $$missing >/dev/null || \
	      (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null); \
	  else echo "note: missing $$missing; apt-get install them to run the real-data and browser tests"; fi; \
	fi

fmnist-data: system-deps

demo: venv
	$(BIN)/aae-ray demo aae-demo

lint: venv
	$(BIN)/ruff check .

test: venv system-deps lint
	$(BIN)/pytest -q

# The everyday loop: everything but the tests marked slow (Ray, Serve, the browser, real training runs).
test-fast: venv lint
	$(BIN)/pytest -q -m "not slow"

bench-fmnist: venv fmnist-data
	$(BIN)/python bench/fmnist.py

# Two one-thread processes, each half the classes, fill one table: 1.3x sooner on 2 cores than one process.
bench-fmnist-methods: venv fmnist-data
	$(BIN)/python bench/fmnist_methods.py --threads 1 --classes 0 1 2 3 4 --findings --findings-classes 0 2 & a=$$!; \
	$(BIN)/python bench/fmnist_methods.py --threads 1 --classes 5 6 7 8 9 --findings --findings-classes 4 6; \
	b=$$?; wait $$a && exit $$b

clean:
	rm -rf $(VENV) aae-demo .pytest_cache .ruff_cache *.egg-info

bench-tune: venv fmnist-data
	$(BIN)/python bench/tune.py

bench-active-learning: venv fmnist-data
	$(BIN)/python bench/active_learning.py

# Issue 14's table: every family, the AAE's global/local/combined T2 and the patch baseline on the synthetic joints,
# three real texture surfaces with synthetic defects and Fashion-MNIST (resumable; about 90 minutes on 2 cores).
bench-local: venv fmnist-data
	$(BIN)/python bench/local_defects.py

bench-serve: venv
	$(BIN)/python bench/serve_load.py

# Issue 17's prediction log under load: rows lost on a clean stop and after a SIGKILL of the replica, and what
# logging costs the throughput (about 4 minutes on 2 cores).
bench-line: venv
	$(BIN)/python bench/line.py

bench-edge: venv fmnist-data
	$(BIN)/python bench/edge.py

bench-speed: venv fmnist-data
	$(BIN)/python bench/speed.py

# Needs a CUDA GPU (and a CUDA build of torch in place of the CPU wheel the venv pins).
bench-gpu: venv fmnist-data
	$(BIN)/python bench/gpu.py --fmnist /usr/share/datasets/fashion-mnist
