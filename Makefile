# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   # fetch the builtin corpus, train the tokenizer, pretrain the shakespeare preset, print samples
#   make test   # the whole test suite
# Both create and fill .venv first. Another interpreter: make test PYTHON=python3.12 (gets its own venv).
# For the edit loop: make test-fast (tests not marked slow) and make lint (ruff, as CI runs it).

PYTHON ?= python3
VENV ?= .venv$(if $(filter python3,$(PYTHON)),,-$(notdir $(PYTHON)))
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-chat test test-fast lint format bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py --config shakespeare $(ARGS)

# pretrained demo model (trained first if missing) -> SFT -> DPO on synthetic chat tasks -> eval table
demo-chat: $(STAMP)
	$(BIN)/python -m llm_jax.tools.demo_chat

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py $(ARGS)
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
