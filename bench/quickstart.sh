#!/bin/bash
# The README's first command, timed from a fresh clone: make install data eval cache distill.
# Run it on an otherwise idle machine (another process on the same cores makes torch's threads spin-wait:
# the eval step took 727 s instead of 46 s beside one training run).
#   bench/quickstart.sh [REPO] [WORKDIR]   -> bench/results/quickstart.{json,md} in this checkout
# With --report TIMES, only writes the results from an earlier run's times file.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
report() {  # times file -> bench/results/quickstart.{json,md}
  PYTHONPATH="$here" python3 - "$1" "$here/bench/results/quickstart" <<'PY'
import os, sys
from mcad_core.atomic import atomic_write_bytes, atomic_write_json
times, out = sys.argv[1], sys.argv[2]
lines = open(times).read().split("\n")
head = lines[0].split(" ", 2)  # "start HH:MM:SS <commit line>"
steps = []
for line in lines[1:]:
    parts = line.split()
    if len(parts) >= 4 and parts[1].startswith("rc="):
        steps.append({"target": parts[0], "rc": int(parts[1][3:]), "seconds": int(parts[2])})
total = sum(s["seconds"] for s in steps)
ok = len(steps) == 5 and all(s["rc"] == 0 for s in steps)
result = {"command": "make install data eval cache distill", "commit": head[2].split()[0] if len(head) > 2 else None,
          "steps": steps, "total_seconds": total, "finished": ok, "goal_seconds": 3600,
          "met": ok and total <= 3600, "cpu_count": os.cpu_count()}
atomic_write_json(out + ".json", result)
rows = "\n".join(f"| `make {s['target']}` | {s['seconds']} | {s['rc']} |" for s in steps)
atomic_write_bytes(out + ".md", (f"# Quickstart from a fresh clone\n\n`bench/quickstart.sh` at {result['commit']}, "
      f"{result['cpu_count']} CPU cores, nothing else running, pip's wheel cache warm (packages are not downloaded again).\n\n| step | seconds | exit |\n|---|---:|---:|\n{rows}\n"
      f"| **total** | **{total}** ({total / 60:.1f} min) | goal <= 3600: {'met' if result['met'] else 'missed'} |\n").encode())
print(open(out + ".md").read())
PY
}
if [ "${1:-}" = "--report" ]; then report "$2"; exit; fi
repo=${1:-$here}; work=${2:-/tmp/mcad-quickstart}
rm -rf "$work" && git clone -q "$repo" "$work" && cd "$work" || exit 1
times="$work.times"
echo "start $(date +%T) $(git log --oneline | head -1)" > "$times"
for t in install data eval cache distill; do
  s=$(date +%s); make $t >> "$work.log" 2>&1; rc=$?; e=$(date +%s)
  echo "$t rc=$rc $((e-s)) s $(date +%T)" >> "$times"
  [ $rc -ne 0 ] && break
done
report "$times"
