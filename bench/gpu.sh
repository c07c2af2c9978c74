#!/usr/bin/env bash
# One call on a GPU machine: the CUDA tests and the GPU benchmarks, then one summary table.
# Budget: under 8 minutes on an H100/H200.   Usage: bash bench/gpu.sh [outdir]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/facemux-gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# The machine brings its own CUDA torch (and torchvision, for nvjpeg); install the rest around
# it. Offline GPU machines get the wheels bench/gpu_wheels.sh put in .whl/.
if [ -d .whl ]; then
  python3 -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
    || echo "warning: .whl/ holds Python 3.12 wheels but python3 is $(python3 -V)"
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --upgrade --target /tmp/facemux-site .whl/*.whl >"$out/pip.log" 2>&1 \
    || { echo "wheel install failed (see $out/pip.log)"; tail -5 "$out/pip.log"; }
  cp -r .whl/site/. /tmp/facemux-site/
  export PYTHONPATH=/tmp/facemux-site${PYTHONPATH:+:$PYTHONPATH}
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --no-build-isolation -e . >>"$out/pip.log" 2>&1 \
    || { echo "facemux install failed (see $out/pip.log)"; tail -5 "$out/pip.log"; }
else
  python3 -m pip install -q --disable-pip-version-check -e ".[server,dev]" >"$out/pip.log" 2>&1 \
    || { echo "pip install failed (see $out/pip.log)"; tail -5 "$out/pip.log"; }
fi
python3 -c "import torch, facemux.service.server as s; print('torch', torch.__version__, \
  'cuda', torch.cuda.is_available())" || echo "facemux does not import: see $out/pip.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "exit ${PIPESTATUS[0]}" >>"$out/$name.log"
}

run cuda_tests 180 python3 -m pytest -q -m cuda tests
run model_df128 150 python3 bench/model_throughput.py --preset df128 --device cuda \
  --batches 1,8,64,256 --seconds 2 --compile
run swap_df128 150 python3 bench/swap_throughput.py --preset df128 --device cuda \
  --clients 16 --faces-per-call 64 --seconds 10 --max-wait-ms 2
run swap_df128_single 90 python3 bench/swap_throughput.py --preset df128 --device cuda \
  --clients 32 --faces-per-call 1 --seconds 8 --max-wait-ms 1
run frames 60 python3 bench/frame_stages.py
run jpeg 60 python3 bench/jpeg_codec.py --frames 64 --clients 16
run frames_nvjpeg 75 python3 bench/frame_throughput.py --device cuda --gpu-jpeg on \
  --clients 16 --seconds 5 --stream-frames 100
run frames_hostjpeg 75 python3 bench/frame_throughput.py --device cuda --gpu-jpeg off \
  --clients 16 --seconds 5 --stream-frames 100
run memory 60 python3 bench/memory.py --preset df128 --identities 8 --device cuda

echo
echo "== summary ($(head -1 "$out/gpu.txt"), $(date -u +%Y-%m-%d))"
grep -h "^summary\|passed\|failed" "$out"/*.log
