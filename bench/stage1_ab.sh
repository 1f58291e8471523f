#!/bin/bash
# Stage-1 embed pass, side by side: two checkouts of this repository (e.g. `git worktree add`), alternated.
#   bash bench/stage1_ab.sh OLD_TREE NEW_TREE SHARD_DIR [REPEATS]
# Runs `mcad cache --passes embed` over SHARD_DIR with each tree's code (PYTHONPATH), REPEATS times each,
# alternating, and prints wall seconds, seconds inside teacher forwards and their ratio per run.
set -euo pipefail
old=$1 new=$2 shards=$3 repeats=${4:-2}
out=$(mktemp -d)
for rep in $(seq 1 "$repeats"); do
  for tree in "$old" "$new"; do
    name=$(basename "$tree")_$rep
    PYTHONPATH=$tree .venv/bin/mcad cache --teachers artifacts/teachers --shards "$shards" --store "$out/$name.zarr" \
      --passes embed --block-shards 100 --summary-json "$out/$name.json" > "$out/$name.log" 2>&1
    python3 -c "import json; s=json.load(open('$out/$name.json'))['summary']; \
print('$name', round(s['wall_seconds'], 1), round(s['teacher_seconds'], 1), s['overhead_ratio'])"
    rm -rf "$out/$name.zarr"
  done
done
