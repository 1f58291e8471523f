# MCAD: run the teachers once into a cache, distill students from it.
# Every target works offline on the embedded default world.
# Runs write under artifacts/ and runs/; bench/results/ (the committed reference figures) changes only
# through `make publish` and `make bench`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data/default
TEACHER_DATA ?= data/teacher_pool
TEACHERS ?= teachers/default
OTHER_DATA ?= data/quadrants
OTHER_TEACHER_DATA ?= data/quadrants_pool
CACHE  ?= artifacts/cache/default.zarr
RESULTS ?= artifacts/results
EVAL_JSON ?= artifacts/eval/teachers.json
RUN    ?= runs/default
SMOKE  ?= artifacts/smoke

.DEFAULT_GOAL := help
.PHONY: help install data teacher-data teachers ship-teachers other-world other-teachers eval cache distill publish \
        ablation bench export \
        clip-benchmark smoke test

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

install:  ## Create $(VENV) and install the project with pip (pinned torch/torchvision pair)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e .

data:  ## Generate the default world's distillation set (5k train, 1k val, 1k test; ~5 s) into $(DATA)
	$(BIN)/mcad data --out $(DATA) --n-train 5000

teacher-data:  ## Generate the teachers' own data (100k samples from another seed; ~1 min) into $(TEACHER_DATA)
	$(BIN)/mcad data --out $(TEACHER_DATA) --seed 1 --n-train 100000

teachers: teacher-data  ## Retrain the shipped teachers from scratch into artifacts/teachers (92 min on 2 shared cores)
	$(BIN)/mcad teachers --config configs/teachers.toml --data $(TEACHER_DATA) --out artifacts/teachers

other-world:  ## The second world (mcad data --world quadrants): a 1k distillation set and its teachers' own 100k
	$(BIN)/mcad data --world quadrants --out $(OTHER_DATA) --n-train 1000
	$(BIN)/mcad data --world quadrants --out $(OTHER_TEACHER_DATA) --seed 1 --n-train 100000

other-teachers:  ## The second world's teachers, the default world's recipe on its own data (66 min on 2 cores) -> artifacts/teachers_quadrants
	$(BIN)/mcad teachers --config configs/teachers.toml --data $(OTHER_TEACHER_DATA) --out artifacts/teachers_quadrants

ship-teachers:  ## Pack artifacts/teachers as float16 into teachers/default (what the repository ships)
	$(BIN)/python -m mcad_world.ship artifacts/teachers teachers/default

eval:  ## Recall@1/5/10 of every teacher on the test split, table + $(EVAL_JSON)
	$(BIN)/mcad eval --teachers $(TEACHERS) --shards $(DATA)/test --out $(EVAL_JSON)

cache:  ## Stage 1: teachers once -> Zarr cache $(CACHE), then describe it
	$(BIN)/mcad cache --teachers $(TEACHERS) --shards $(DATA)/train --store $(CACHE) --summary-json $(RESULTS)/cache_run.json
	$(BIN)/mcad cache-info $(CACHE)

distill:  ## Stage 2: a student from the cache alone (no teacher loaded), then its recalls on the test split
	$(BIN)/mcad distill --store $(CACHE) --out $(RUN) --eval-shards $(DATA)/test --teacher-table $(EVAL_JSON) --results-json $(RESULTS)/distill.json

publish:  ## Copy this machine's make cache summary into bench/results/ (distill.json: python -m bench.regime, 3 seeds)
	cp $(RESULTS)/cache_run.json bench/results/

ablation:  ## Rows (a)-(f) at make distill's steps, 3 seeds (online row 1 seed) into runs/ablation
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

smoke:  ## The whole chain at toy sizes (~1.5 min): data, teachers, eval, cache, distill, export, index, search
	rm -rf $(SMOKE)
	$(BIN)/mcad data --out $(SMOKE)/data --n-train 400 --n-val 50 --n-test 100 --samples-per-shard 100
	$(BIN)/mcad teachers --data $(SMOKE)/data --out $(SMOKE)/teachers --clip-steps 30 --blip-steps 10
	$(BIN)/mcad eval --teachers $(SMOKE)/teachers --shards $(SMOKE)/data/test --out $(SMOKE)/eval.json
	$(BIN)/mcad cache --teachers $(SMOKE)/teachers --shards $(SMOKE)/data/train --store $(SMOKE)/cache.zarr --views 2 -k 5 --block-shards 2
	$(BIN)/mcad distill --store $(SMOKE)/cache.zarr --out $(SMOKE)/run --eval-shards $(SMOKE)/data/test --steps 40 --batch-size 32 --teacher-table $(SMOKE)/eval.json
	$(BIN)/mcad export --student $(SMOKE)/run/student --out $(SMOKE)/export
	$(BIN)/mcad index --export $(SMOKE)/export --shards $(SMOKE)/data/test --out $(SMOKE)/index
	$(BIN)/mcad search --index $(SMOKE)/index --query "a red circle left of a blue square" -k 5

test:  ## Run the test suite (tiny random-init models, tiny generated shards)
	$(BIN)/python -m pytest -q
