# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the project with its test extras;
# a second run finds the install stamp up to date and skips straight to the work.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test bench bench-stage-a bench-data bench-photos install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# torch and torchvision are installed together from the registry so their versions match.
	$(BIN)/python -m pip install torch torchvision
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ldm demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Speed and sampling quality, ours against the references (README "Performance"). The sampling
# benchmark uses the demo's model, so the demo runs first if it has not.
$(DEMO_OUT)/summary.json: | $(STAMP)
	$(BIN)/ldm demo --out $(DEMO_OUT)

bench: $(STAMP) $(DEMO_OUT)/summary.json
	$(BIN)/python -m benchmarks.run_all --pipeline $(DEMO_OUT)/stage_b/pipeline --out runs/bench

# Why Stage A starts fast (README): held-out PSNR after 250/500/1000 steps, factor by factor (~40 min).
bench-stage-a: $(STAMP)
	$(BIN)/python -m benchmarks.stage_a_factors --out runs/bench

# Streaming input at 2,000 and 20,000 photo-like images (README "Data"; ~30 min), and an autoencoder
# trained on scikit-image's photographs, benchmarked on ones it never saw (~5 min).
bench-data: $(STAMP)
	$(BIN)/python -m benchmarks.bench_data --out runs/bench

bench-photos: $(STAMP)
	$(BIN)/python -m benchmarks.real_photos --out runs/bench/real_photos --steps 1500

clean:
	rm -rf $(VENV) runs
