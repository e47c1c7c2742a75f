# The two commands of the README: `make serve` and `make test`. Each installs what it needs first.
VENV ?= .venv
export LORAMUX_VENV := $(VENV)

.PHONY: serve test gpu-test acceptance lint install

# With the clients the README's examples use (openai; matplotlib for the load generator's plot).
install:
	@scripts/setup.sh client

serve: install
	$(VENV)/bin/loramux serve

test:
	@scripts/setup.sh dev
	@scripts/test-services.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Every test marked gpu (the Triton kernels, CUDA graphs, streams, pinned copies), on a machine with an NVIDIA GPU;
# it stops with an error where torch sees no CUDA device or Triton is missing, rather than skipping them.
gpu-test:
	@scripts/setup.sh dev
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -rs -m gpu --require-gpu $(PYTEST_ARGS)

# A new user's whole first hour on the real default model (train with the defaults, serve, merge, serve the merge):
# about 4 minutes on 2 idle cores, mostly training, so not part of `make test`; run it after changes to training or
# merging.
acceptance:
	@scripts/setup.sh dev
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -rs -m acceptance --acceptance $(PYTEST_ARGS)

lint:
	@scripts/setup.sh dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
