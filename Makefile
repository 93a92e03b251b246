# Two commands for a newcomer: `make demo` and `make test`. Both install what is missing
# into .venv first (torch 2.13.0 CPU build first, so nothing pulls CUDA wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
export PYTHONPATH := $(CURDIR)

.PHONY: install browser demo test test-fast lint bench bench-llm bench-gpu bench-s3 bench-scale bench-hosted clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[examples,test]'
	@# the editable install leaves airflow_batch_provider.egg-info here; with the repository root on
	@# sys.path (PYTHONPATH, or the working directory) it is a second copy of the distribution, and
	@# Airflow loads its plugin entry point twice ("Plugin 'batch_sink_status' already registered")
	@rm -rf airflow_batch_provider.egg-info
	@$(MAKE) --no-print-directory browser
	@rm -f $(VENV)/.installed-* && touch $@

# Headless Chromium for the status page's browser test, from the OS packages where we may install them.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	      echo "could not install chromium: the status page's browser test will be skipped"; \
	  else echo "chromium is not installed and apt-get is not available to root here: the browser test will be skipped"; fi

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -ra tests

test-fast: install
	$(PY) -m pytest -ra -m "not slow" tests

# Checks chosen in pyproject.toml ([tool.ruff]): syntax errors, pyflakes, bugbear, import order.
lint: install
	$(VENV)/bin/ruff check airflow_batch_provider benchmarks dags docs/examples scripts tests

bench: install
	$(PY) benchmarks/run.py
	$(PY) benchmarks/generation.py

# LLM generation on a tiny random-weight Llama (CPU): bare generate loop vs the provider, tokens/s.
bench-llm: install
	$(PY) benchmarks/generation.py

bench-gpu: install
	$(PY) benchmarks/gpu.py

# Planning over 10,000 committed shards on a SeaweedFS S3 server it starts and stops itself.
bench-s3: install
	$(PY) benchmarks/s3_plan.py --shards $(or $(SHARDS),10000)

# The provider's own cost with a cheap model: I/O ceiling, resume against Ray Data's
# checkpointing, planning cost. Sizes: SCALE_* variables (benchmarks/scale.py).
bench-scale: install
	$(PY) benchmarks/scale.py

# The OpenAI-compatible predictor against a loopback server: rows/s vs a bare loop, cost of a 429 burst.
bench-hosted: install
	$(PY) benchmarks/hosted.py

clean:
	rm -rf .demo .bench .bench-llm .bench-scale .pytest_cache
