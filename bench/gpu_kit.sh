#!/usr/bin/env bash
# Packs what a run of the bench needs on an offline NVIDIA machine (Python 3.12, CUDA 13 libraries)
# into three folders of at most ~37 MiB each, for leases whose calls carry 64 MiB, working tree
# (~20 MiB) included:
#
#   bench/gpu_kit.sh [OUTDIR]      (default: .gpu; writes OUTDIR/g0, OUTDIR/g1 and OUTDIR/g2)
#
# g0 holds unpack.sh, the mlx and mlx-lm wheels and lmx's dependencies at this checkout's versions
# (g0/extra); g1 and g2 MLX's CUDA backend in parts. On the machine, with all three copied into one
# folder DIR: bash DIR/g0/unpack.sh DIR /tmp/mlxsite (it joins the parts in path order and installs
# every extra/*.whl). g0/stamp names the kit's recipe (this script and pyproject.toml), which
# bench/gpu_run.sh checks against the tree it runs from: a kit older than them stops the run at once.
set -euo pipefail
out=${1:-.gpu}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
bash "$here/../shared/gpu/pack-mlx-cuda.sh" "$tmp/k" >/dev/null
rm -rf "$out" && mkdir -p "$out/g0/extra" "$out/g1" "$out/g2"
cat "$tmp"/k/a/part_* "$tmp"/k/b/part_* | (cd "$tmp" && split -b 36M -d - part_)
parts=("$tmp"/part_*)
mv "${parts[0]}" "$out/g1/"
mv "${parts[@]:1}" "$out/g2/"
cp "$tmp"/k/a/*.whl "$tmp"/k/a/unpack.sh "$out/g0/"
# huggingface_hub 2.x is left out: the lent machines' transformers refuses it, and the bench
# downloads nothing (httpx2 and httpcore2 go: lmx's download errors import them).
names='fastapi starlette uvicorn httptools uvloop orjson pydantic pydantic_core typing-inspection
  annotated-types annotated-doc opentelemetry-api typing_extensions anyio llguidance structlog
  prometheus_client ruamel.yaml watchfiles APScheduler tzlocal rich markdown-it-py mdurl psutil
  truststore httpx2 httpcore2'
pins=$("$python" -m pip freeze | grep -i -E "^($(echo $names | tr ' ' '|'))==")
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out/g0/extra" $pins
cat "$here/bench/gpu_kit.sh" "$here/pyproject.toml" | sha256sum | cut -c1-16 >"$out/g0/stamp"
du -sh "$out"/g*
