#!/bin/bash
# Stage 1 side by side: two checkouts of this repository (e.g. `git worktree add`), alternated.
#   [PASSES=embed] [BLOCK_SHARDS=100] [KEEP=DIR] bash bench/stage1_ab.sh OLD_TREE NEW_TREE SHARD_DIR [REPEATS]
# Runs `mcad cache --passes $PASSES` over SHARD_DIR with each tree's code (PYTHONPATH), REPEATS times each,
# alternating, and prints wall seconds, seconds inside teacher forwards and their ratio per run. The full
# `make cache`: PASSES=embed,search,rescore,fuse,integrate BLOCK_SHARDS=4. KEEP: keep each run's summary JSON there.
set -euo pipefail
old=$1 new=$2 shards=$3 repeats=${4:-2}
passes=${PASSES:-embed} block_shards=${BLOCK_SHARDS:-100}
out=$(mktemp -d)
for rep in $(seq 1 "$repeats"); do
  for tree in "$old" "$new"; do
    name=$(basename "$tree")_$rep
    PYTHONPATH=$tree .venv/bin/mcad cache --teachers artifacts/teachers --shards "$shards" --store "$out/$name.zarr" \
      --passes "$passes" --block-shards "$block_shards" --summary-json "$out/$name.json" > "$out/$name.log" 2>&1
    python3 -c "import json; s=json.load(open('$out/$name.json'))['summary']; \
print('$name', round(s['wall_seconds'], 1), round(s['teacher_seconds'], 1), s['overhead_ratio'])"
    rm -rf "$out/$name.zarr"
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$out/$name.json" "$KEEP/"; fi
  done
done
