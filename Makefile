# MCAD: run the teachers once into a cache, distill students from it.
# Every target works offline on the embedded default world.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data/default
TEACHERS ?= artifacts/teachers
CACHE  ?= artifacts/cache/default.zarr

.DEFAULT_GOAL := help
.PHONY: help install data teachers eval cache distill ablation bench export clip-benchmark test

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## Create $(VENV) and install the project with pip (pinned torch/torchvision pair)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e .

data:  ## Generate the default image-text world (22k samples, ~15 s) into $(DATA)
	$(BIN)/mcad data --out $(DATA)

teachers:  ## Train two CLIPs and a BLIP ITM on the default world (CPU, 12-15 min on 2 cores)
	$(BIN)/mcad teachers --data $(DATA) --out $(TEACHERS)

eval:  ## Recall@1/5/10 of every teacher on the test split, table + artifacts/eval/teachers.json
	$(BIN)/mcad eval --teachers $(TEACHERS) --shards $(DATA)/test --out artifacts/eval/teachers.json

cache:  ## Stage 1: teachers once -> Zarr cache $(CACHE) (~3 min on the default world), then describe it
	$(BIN)/mcad cache --teachers $(TEACHERS) --shards $(DATA)/train --store $(CACHE) --summary-json bench/results/cache_run.json
	$(BIN)/mcad cache-info $(CACHE)

distill:  ## Stage 2: a student from the cache alone (no teacher loaded), then its recalls on the test split
	$(BIN)/mcad distill --store $(CACHE) --out runs/default --eval-shards $(DATA)/test --results-json bench/results/distill.json

ablation:  ## Rows (a)-(f) at make distill's steps, 3 seeds (online row 1 seed; ~3.5 h on 2 cores) into runs/ablation
	$(BIN)/mcad ablation --store $(CACHE) --out runs/ablation --eval-shards $(DATA)/val --seeds 0,1,2 --online-seeds 0

bench:  ## Benchmarks (~11 min on 2 idle CPU cores; needs make cache distill) -> bench/results/*.{json,md,png}
	$(BIN)/python bench/search_latency.py --student runs/default/student
	$(BIN)/python bench/search_rss_parts.py
	$(BIN)/python -m bench.fused_pass --blip $(TEACHERS)/blip --shards $(DATA)/train
	$(BIN)/python -m bench.clip_block
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

export:  ## The default student as open_clip + TorchScript + ONNX (checked with onnxruntime) into exports/default
	$(BIN)/mcad export --student runs/default/student --out exports/default

clip-benchmark:  ## clip_benchmark (unmodified) vs mcad eval on the test split, exported student -> bench/results/clip_benchmark.*
	$(BIN)/python bench/clip_benchmark_check.py --export exports/default --shards $(DATA)/test

test:  ## Run the test suite (tiny random-init models, tiny generated shards)
	$(BIN)/python -m pytest -q
