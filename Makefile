# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the project with its test extras;
# a second run finds the install stamp up to date and skips straight to the work.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test bench bench-stage-a bench-data bench-photos bench-photos-gan bench-photos-ldm bench-sample-metric bench-latent-space photo-corpus gpu-check install clean

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
	$(BIN)/python -m pytest -q --numprocesses auto --maxprocesses 4 --dist worksteal tests

# Speed and sampling quality, ours against the references (docs/performance.md). The sampling
# benchmark uses the demo's model, so the demo runs first if it has not.
$(DEMO_OUT)/summary.json: | $(STAMP)
	$(BIN)/ldm demo --out $(DEMO_OUT)

bench: $(STAMP) $(DEMO_OUT)/summary.json
	$(BIN)/python -m benchmarks.run_all --pipeline $(DEMO_OUT)/stage_b/pipeline --out runs/bench

# Why Stage A starts fast (docs/stage-a-fast-start.md): held-out PSNR after 250/500/1000 steps, factor by factor (~40 min).
bench-stage-a: $(STAMP)
	$(BIN)/python -m benchmarks.stage_a_factors --out runs/bench

# Streaming input at 2,000 and 20,000 photo-like images (docs/data.md; ~30 min).
bench-data: $(STAMP)
	$(BIN)/python -m benchmarks.bench_data --out runs/bench

# Real photographs (docs/real-photographs.md): Debian's wallpaper photographs, fetched with apt-get into
# PHOTO_CORPUS (outside the repository), train configs/vae/kl-f8-photo.yaml, which is benchmarked on six kinds
# of image it never saw (benchmarks/photo_test_set.py). bench-photos-gan adds the same run with the PatchGAN on.
PHOTO_CORPUS ?= $(HOME)/.cache/two-stage-ldm/photo-corpus

photo-corpus: $(STAMP)
	$(BIN)/python -m benchmarks.photo_corpus --out $(PHOTO_CORPUS)

bench-photos: $(STAMP)
	$(BIN)/python -m benchmarks.real_photos --corpus $(PHOTO_CORPUS) --out runs/bench/real_photos

bench-photos-gan: $(STAMP)
	$(BIN)/python -m benchmarks.real_photos --corpus $(PHOTO_CORPUS) --out runs/bench/real_photos --compare-gan

# Stage B on the photo autoencoder's latents of 128 px crops, its SWD curve and samples beside real crops
# (docs/real-photographs.md); trains the autoencoder first when make bench-photos has not.
runs/bench/real_photos/summary.json: | $(STAMP)
	$(BIN)/python -m benchmarks.real_photos --corpus $(PHOTO_CORPUS) --out runs/bench/real_photos

bench-photos-ldm: $(STAMP) runs/bench/real_photos/summary.json
	$(BIN)/python -m benchmarks.real_photos_ldm --photos-run runs/bench/real_photos --corpus $(PHOTO_CORPUS) --out runs/bench/real_photos_ldm

# Does SWD order the demo's Stage B checkpoints as the exact shapes scorer does (docs/sample-metrics.md)? Needs a
# demo run that kept its checkpoints: ldm demo --out runs/demo stage_b.train.keep_checkpoints=8 stage_b.train.checkpoint_every=1000
bench-sample-metric: $(STAMP)
	$(BIN)/python -m benchmarks.sample_metric_rank --run $(DEMO_OUT)/stage_b --out runs/bench

# Which autoencoder does the demo's Stage B learn fastest on, and which `ldm inspect-vae` figure says so
# beforehand (docs/latent-space.md)? Fine-tunes the demo's autoencoder with each option, then Stage B twice
# on each; needs the demo's autoencoder (make demo). A killed run continues where it stopped.
bench-latent-space: $(STAMP) $(DEMO_OUT)/summary.json
	$(BIN)/python -m benchmarks.latent_space_experiment --demo-vae $(DEMO_OUT)/stage_a/vae --out runs/bench/latent_space

# On a GPU machine: the machine, its measured limits, both trainers under bf16/fp16, both stages' speed,
# sampling and the demo, in at most 8 minutes (docs/gpu-check.md). runs/gpu_check/gpu_check.json is
# rewritten after every section; without CUDA the same package runs its tiny mode.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check --out runs/gpu_check

clean:
	rm -rf $(VENV) runs
