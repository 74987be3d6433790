# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   # fetch the builtin corpus, train the tokenizer, pretrain the shakespeare preset, print samples
#   make test   # the whole test suite
# Both create and fill .venv first (make test also .venv-beam, where data.engine=beam's tests run). Another
# interpreter: make test PYTHON=python3.12 (gets its own venvs).
# For the edit loop: make test-fast (tests not marked slow) and make lint (ruff, as CI runs it).
# Tests run in TEST_WORKERS processes (pytest-xdist), a test file per process at a time (its fixtures are
# built once): make test TEST_WORKERS=8 on a larger machine.

PYTHON ?= python3
VENV ?= .venv$(if $(filter python3,$(PYTHON)),,-$(notdir $(PYTHON)))
BIN := $(VENV)/bin
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile
STAMP := $(VENV)/.installed
# data.engine=beam's environment: apache-beam requires protobuf < 7, transformers (in dev) protobuf 7 (pyproject.toml)
BEAM_VENV := $(VENV)-beam
BEAM_BIN := $(BEAM_VENV)/bin
BEAM_STAMP := $(BEAM_VENV)/.installed

.PHONY: demo demo-chat test test-fast lint format bench venv venv-beam clean

venv: $(STAMP)

venv-beam: $(BEAM_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BEAM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BEAM_VENV)
	$(BEAM_BIN)/python -m pip install --quiet --upgrade pip
	$(BEAM_BIN)/python -m pip install --quiet -e '.[beam-tests]'
	touch $(BEAM_STAMP)

demo: $(STAMP)
	$(BIN)/python train.py --config shakespeare $(ARGS)

# pretrained demo model (trained first if missing) -> SFT -> DPO on synthetic chat tasks -> eval table
demo-chat: $(STAMP)
	$(BIN)/python -m llm_jax.tools.demo_chat

# the suite, then (unless ARGS picks tests) the Beam engine's tests in its own environment
test: $(STAMP) $(BEAM_STAMP)
	$(PYTEST) $(ARGS)
	$(if $(ARGS),,$(BEAM_BIN)/python -m pytest tests/test_beam_curate.py)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) $(BEAM_STAMP)
	$(BIN)/python benchmarks/train_throughput.py $(ARGS)
	$(BEAM_BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) $(BEAM_VENV) runs .pytest_cache
