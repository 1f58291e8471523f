#!/usr/bin/env bash
# Stage 1 on one machine with several GPUs, no scheduler: torchrun starts NPROC embed workers (each reads
# RANK/WORLD_SIZE through mcad_core.dist.task_place and embeds its strided share of the shards), then, after every
# worker has exited successfully, NPROC workers run the block passes on their strided share of the blocks (the one
# that fuses the last block runs integrate).
#   CONFIG=configs/cache.json NPROC=4 jobs/torchrun_cache.sh
set -euo pipefail
CONFIG=${CONFIG:?set CONFIG to your cache config}

torchrun --standalone --nproc_per_node="${NPROC:-2}" -m pipeline.cli cache --config "$CONFIG" --passes embed
torchrun --standalone --nproc_per_node="${NPROC:-2}" -m pipeline.cli cache --config "$CONFIG" \
  --passes search,rescore,fuse,integrate
