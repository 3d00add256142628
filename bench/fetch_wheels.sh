#!/usr/bin/env bash
# Download the wheels that the offline GPU machine lacks into .whl/ (git-ignored), for
# bench/gpu_check.sh to install with `pip install --no-index --no-deps`.
#
# The device image (see docs/performance.md) has Python 3.12, x86-64, torch 2.11 /
# triton 3.6, torchvision, regex, tqdm, huggingface_hub, safetensors, timm, but not
# open_clip_torch, ftfy, wcwidth or xformers.  Pass another Python version as $1.
#
#   bash bench/fetch_wheels.sh          # then: run bash bench/gpu_check.sh, carrying .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '.whl/' .gitignore 2>/dev/null \
    || echo '/.whl/' >> .git/info/exclude

# pinned: what this suite was written against; xformers 0.0.35 needs torch >= 2.10
PKGS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 xformers==0.0.35)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
for p in "${PKGS[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
        --implementation cp "${PLAT[@]}" -d .whl "$p"
done
# one version of each package only (two would stop the install)
ls -1 .whl/*.whl | sed 's#.*/##' | cut -d- -f1 | sort | uniq -d | while read -r dup; do
    echo "warning: several versions of $dup in .whl/; keep one" >&2
done
du -ch .whl/*.whl | tail -1
ls -1 .whl
