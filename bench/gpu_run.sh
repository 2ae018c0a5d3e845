#!/usr/bin/env bash
# One bench.run_throughput run on a lent NVIDIA machine, from the kit bench/gpu_kit.sh packs (its
# folders g0, g1, g2 copied into KIT, default /root/mlxparts). Unpacks the kit the first time, then
# runs from this checkout with the given arguments, for at most LIMIT_S seconds (default 540), its
# files straight into $OUT (the device's folder that comes back), so a run cut short keeps the
# points it finished:
#
#   bash bench/gpu_run.sh --preset qwen3-0.6b --concurrency 2 --repeats 16 --device-label h100-X
#
# Each side's stepping thread runs on CPU STEP_CPU (default 3) alone. MODULE=worker_ab runs
# bench.worker_ab instead:
#
#   MODULE=worker_ab bash bench/gpu_run.sh --preset qwen3-0.6b --processes --draws 4 \
#     --modes raw,tuned,thread --concurrency 2,16 --seconds 240 --device-label h100-X
set -euo pipefail
kit=${KIT:-/root/mlxparts}
site=/tmp/mlxsite
recipe=$(cat bench/gpu_kit.sh pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$kit/g0/stamp" 2>/dev/null)" != "$recipe" ]; then
  echo "the kit in $kit is not this tree's: rebuild it with bench/gpu_kit.sh and copy it again" >&2
  exit 2
fi
if [ ! -e "$site/.unpacked" ]; then
  bash "$kit/g0/unpack.sh" "$kit" "$site"
  touch "$site/.unpacked"
fi
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader || true
module=${MODULE:-run_throughput}
case $module in
  run_throughput) set -- --no-again --min-requests 4 --rounds 2 "$@" ;;
  worker_ab) ;;
  *) echo "MODULE: $module is neither run_throughput nor worker_ab" >&2; exit 2 ;;
esac
timeout "${LIMIT_S:-540}" python3 -m "bench.$module" --step-cpu "${STEP_CPU:-3}" --out "${OUT:?}" "$@"
