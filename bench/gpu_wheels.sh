#!/usr/bin/env bash
# Wheels for the device machine's python3 (3.12, x86-64, no package index), which has torch, timm's and
# transformers' own needs but not open_clip, webdataset, zarr or numcodecs: fetched here into .whl/ (keep it out
# of git: `echo /.whl/ >> .git/info/exclude`), carried to the device, installed by bench/gpu_check.sh.
# Versions are pyproject.toml's pins (transformers and timm too: the device's own are older).
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
for pkg in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 webdataset==1.0.2 braceexpand==0.1.7 zarr==3.1.6 \
           donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6 transformers==5.24.0 timm==1.0.31; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg"
done
ls .whl
