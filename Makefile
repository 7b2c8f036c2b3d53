# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: demo test test-numerics lint docs bench bench-toy bench-toy-seeds bench-toy-finetune bench-t2i mutants clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(PY) -m pip install --quiet -e '.[plot]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/activate
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

# The text-to-image NTM shipped in the package: a sample grid, prompt-following and bits/dim
# report, then a short training run of the tiny preset. The toy 2-D demo: `trajflow demo`.
demo: $(VENV)/.installed
	$(PY) -m trajflow_t2i demo --out out/demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check trajflow trajflow_t2i tests benchmarks docs
	$(BIN)/ruff format --check trajflow trajflow_t2i tests benchmarks docs

# pytest exits 5 when it collects no test; say so instead of failing obscurely.
test: $(VENV)/.dev-installed lint
	$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; status=0; fi; \
	exit $$status
	$(BIN)/mkdocs build --strict --site-dir site

# The numerics-heavy tests once more on the portable kernels and one thread: an assertion that
# holds only for one CPU's rounding fails here before it fails on a user's machine.
NUMERICS_TESTS := tests/blocks tests/test_ntm.py tests/test_schedules.py tests/test_predictors.py \
	tests/test_flow_matching.py tests/test_finetuning.py tests/test_core.py tests/test_metrics.py \
	tests/test_ntm_x0_mse.py
test-numerics: $(VENV)/.dev-installed
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider $(NUMERICS_TESTS)

# Text to image on one CPU budget: NTM (T = 1..8) vs flow matching vs TarFlow (about 30 min),
# the learned denoiser vs the score path on the shipped model, and the GPU suite's CPU fallback.
bench-t2i: $(VENV)/.dev-installed
	mkdir -p benchmarks/results
	$(PY) benchmarks/t2i.py --out benchmarks/results/t2i_cpu.json
	$(PY) benchmarks/denoiser.py --checkpoint trajflow_t2i/weights --denoiser trajflow_t2i/weights/denoiser --out benchmarks/results/denoiser_cpu.json
	$(PY) benchmarks/cuda_suite.py --device auto --out benchmarks/results/cuda_suite_cpu.json

# Deliberate bugs in the numerics, one at a time, against the tests (outside CI, minutes);
# review every survivor. See benchmarks/mutants.py.
mutants: $(VENV)/.dev-installed
	$(PY) benchmarks/mutants.py

docs: $(VENV)/.dev-installed
	$(BIN)/mkdocs serve

bench: $(VENV)/.dev-installed
	mkdir -p benchmarks/results
	$(PY) benchmarks/blocks.py --out benchmarks/results/blocks_cpu.json

# Few-step quality on every registered toy dataset (about 6 minutes each on 2 cores).
bench-toy: $(VENV)/.dev-installed
	mkdir -p benchmarks/results
	for dataset in checkerboard eight_gaussians two_moons pinwheel spirals; do \
		$(PY) benchmarks/toy2d.py --dataset $$dataset --out benchmarks/results/toy2d_$$dataset.json || exit 1; \
	done

# The toy NTM once per training seed (0, 1, 2): is "T = 8 no worse than T = 4" more than luck?
# About 5 minutes per seed and dataset on 2 cores. X0_MSE_WEIGHT=1 judges the NTM's x̂₀
# regression term the same way (results named toy2d_seeds_x0mse1_*), SEEDS_TRAIN_STEPS="4 8"
# the step counts trained (toy2d_seeds_steps4-8_*).
X0_MSE_WEIGHT ?= 0
SEEDS_TRAIN_STEPS ?=
empty :=
space := $(empty) $(empty)
SEEDS_X0 = $(if $(filter 0 0.0,$(X0_MSE_WEIGHT)),,_x0mse$(X0_MSE_WEIGHT))
SEEDS_STEPS = $(if $(SEEDS_TRAIN_STEPS),_steps$(subst $(space),-,$(strip $(SEEDS_TRAIN_STEPS))))
SEEDS_NAME = toy2d_seeds$(SEEDS_X0)$(SEEDS_STEPS)
bench-toy-seeds: $(VENV)/.dev-installed
	mkdir -p benchmarks/results
	for dataset in checkerboard eight_gaussians two_moons pinwheel spirals; do \
		$(PY) benchmarks/toy2d_seeds.py --dataset $$dataset --seeds 0 1 2 \
			--x0-mse-weight $(X0_MSE_WEIGHT) \
			$(if $(SEEDS_TRAIN_STEPS),--train-steps $(SEEDS_TRAIN_STEPS)) \
			--out benchmarks/results/$(SEEDS_NAME)_$$dataset.json || exit 1; \
	done

# The finetuned NTM's recipe with one setting changed at a time (checkerboard, seed 0): what
# moves four-step quality? About 6 minutes per variant on 2 cores (budget2x: 20, the e2e ones
# about 30). FM@100 comes from bench-toy's result of the same budget; budget2x trains its own.
FT_DATASET ?= checkerboard
FT_VARIANTS = base aux0 pretrain0.25 pretrain0.75 wide lr5e-4 lr4e-3 shift-0.5 shift-0.75 deep_wide e2e e2e_shift-0.75 e2e_steps4-8 e2e_shift-0.75_steps4-8 e2e_bins32 e2e_deep_wide
bench-toy-finetune: $(VENV)/.dev-installed
	mkdir -p benchmarks/results
	for variant in $(FT_VARIANTS); do \
		$(PY) benchmarks/toy2d_finetune.py --dataset $(FT_DATASET) --variant $$variant \
			--fm-from benchmarks/results/toy2d_$(FT_DATASET).json \
			--out benchmarks/results/toy2d_finetune_$(FT_DATASET)_$$variant.json || exit 1; \
	done
	$(PY) benchmarks/toy2d_finetune.py --dataset $(FT_DATASET) --variant budget2x \
		--out benchmarks/results/toy2d_finetune_$(FT_DATASET)_budget2x.json

clean:
	rm -rf $(VENV) site out .pytest_cache .ruff_cache .hypothesis
