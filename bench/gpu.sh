#!/usr/bin/env bash
# The CUDA tests and the GPU benchmarks on a GPU machine, then one summary table.
#
#   bash bench/gpu.sh [outdir] [phase]     phase: all (default), train, serve, aligned, frames
#
# train (about 6 minutes on an H100): the CUDA tests beside a swap-quality run sized to a
#   time budget (original64), then training throughput, job against bare step, on its own.
# serve (about 14 minutes) = aligned, then frames:
#   aligned (about 8): model and aligned-face Swap throughput (one process, four, compiled),
#     batch formation and per-call cost with the defaults;
#   frames (about 6): frames with nvjpeg on and off, BlazeFace batched and not, paste-back,
#     memory.
# A session with a short GPU lease runs the phases as separate calls on the same machine
# (one call may run 10 minutes at most): train and aligned hold the serving-efficiency rows.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/facemux-gpu}}
phase=${2:-all}
# Logs are written aside and packed into one archive in $out after every step, since a GPU
# lease may bring back only a few files, and only what is in $out when it ends.
log=${TMPDIR:-/tmp}/facemux-gpu-$phase
mkdir -p "$out" "$log"
pack() { tar -C "$log" -czf "$out/gpu-$phase-logs.tar.gz" . 2>/dev/null; }
export PYTHONUNBUFFERED=1

# The machine brings its own CUDA torch (and torchvision, for nvjpeg); install the rest around
# it. Offline GPU machines get the wheels bench/gpu_wheels.sh put in .whl/.
if [ -d .whl ]; then
  python3 -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
    || echo "warning: .whl/ holds Python 3.12 wheels but python3 is $(python3 -V)"
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --upgrade --target /tmp/facemux-site .whl/*.whl >"$log/pip.log" 2>&1 \
    || { echo "wheel install failed (see pip.log in the archive)"; tail -5 "$log/pip.log"; }
  cp -r .whl/site/. /tmp/facemux-site/
  export PYTHONPATH=/tmp/facemux-site${PYTHONPATH:+:$PYTHONPATH}
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --no-build-isolation -e . >>"$log/pip.log" 2>&1 \
    || { echo "facemux install failed (see pip.log in the archive)"; tail -5 "$log/pip.log"; }
else
  python3 -m pip install -q --disable-pip-version-check -e ".[server,dev]" >"$log/pip.log" 2>&1 \
    || { echo "pip install failed (see pip.log in the archive)"; tail -5 "$log/pip.log"; }
fi
python3 -c "import torch, facemux.service.server as s; print('torch', torch.__version__, \
  'cuda', torch.cuda.is_available())" || echo "facemux does not import: see pip.log in the archive"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log/gpu.txt"

run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$log/$name.log"
  echo "exit ${PIPESTATUS[0]}" >>"$log/$name.log"
  pack
}

quality() {  # name, preset, batch, lr: one swap-quality recipe in the background
  timeout 330 python3 bench/quality.py --device cuda --budget-seconds "${QUALITY_SECONDS:-200}" \
    --preset "$2" --batch "$3" --lr "$4" >"$log/quality_$1.log" 2>&1 &
}

if [ "$phase" = all ] || [ "$phase" = train ]; then
  # The best recipe of the 2026-11-26 run, alone on the GPU this time (it then shared it).
  quality orig_lr5e-4 original64 16 5e-4
  # One process for the one GPU: -o addopts drops pyproject's two xdist workers (and needs no
  # xdist in the offline wheels).
  run cuda_tests 180 python3 -m pytest -q -o addopts=-ra -m cuda tests
  wait
  for f in "$log"/quality_*.log; do echo "== $(basename "$f" .log)"; tail -3 "$f"; done
  pack
  # Train's default checkpoint policy (every 100 steps, at most one per 10 s).
  run train_tiny 60 python3 bench/train_throughput.py --device cuda --preset tiny \
    --steps 1000 --batch 16 --checkpoint-min-seconds 10
  run train_original64 90 python3 bench/train_throughput.py --device cuda --preset original64 \
    --steps 1000 --batch 64 --faces 128 --checkpoint-min-seconds 10
fi
summary() {
  echo
  echo "== summary ($(head -1 "$log/gpu.txt"), $(date -u +%Y-%m-%d), phase $phase)"
  grep -h "^summary\|passed\|failed" "$log"/*.log
  pack
}
case "$phase" in all | serve | aligned | frames) ;; *) summary; exit 0 ;; esac

if [ "$phase" != frames ]; then
  run model_df128 120 python3 bench/model_throughput.py --preset df128 --device cuda \
    --batches 1,8,64,256 --seconds 2 --compile
  run swap_df128 90 python3 bench/swap_throughput.py --preset df128 --device cuda \
    --clients 16 --faces-per-call 64 --seconds 10 --max-wait-ms 2
  run swap_df128_single 90 python3 bench/swap_throughput.py --preset df128 --device cuda \
    --clients 32 --faces-per-call 1 --seconds 8 --max-wait-ms 1
  # One server process against four on one port (--processes): is the host side the bound?
  run swap_df128_processes 150 python3 bench/swap_throughput.py --preset df128 --device cuda \
    --clients 32 --faces-per-call 1 --seconds 8 --max-wait-ms 1 --processes 4
  # The compiled model (CUDA graphs, batches padded to power-of-two buckets) served and bare.
  run swap_df128_compiled 240 python3 bench/swap_throughput.py --preset df128 --device cuda \
    --clients 32 --faces-per-call 1 --seconds 8 --max-wait-ms 1 --compile reduce-overhead
  # Batch formation and per-call cost with the defaults (provenance on) on the card.
  run convoy_df128 90 python3 bench/swap_throughput.py --convoy --preset df128 --device cuda \
    --clients 16 --max-batch 16 --max-wait-ms 2 --seconds 10
  run serving_path 120 python3 bench/serving_path.py --preset df128 --clients 16 --batch 16 \
    --max-wait-ms 2 --seconds 5 --rounds 2
fi
[ "$phase" != aligned ] || { summary; exit 0; }
run frames 40 python3 bench/frame_stages.py
run jpeg 40 python3 bench/jpeg_codec.py --frames 64 --clients 16
run frames_nvjpeg 60 python3 bench/frame_throughput.py --device cuda --gpu-jpeg on \
  --clients 16 --seconds 5 --stream-frames 100
run frames_hostjpeg 60 python3 bench/frame_throughput.py --device cuda --gpu-jpeg off \
  --clients 16 --seconds 5 --stream-frames 100
# BlazeFace on the card: detection batched across 16 callers against one frame at a time,
# then full frames through the server with the batcher on and off (nvjpeg on).
run detect_batching 90 python3 bench/detectors.py --clients 16 --calls 20 --rounds 3 \
  --device cuda --threads 0
run frames_blazeface 60 python3 bench/frame_throughput.py --device cuda --gpu-jpeg on \
  --detector blazeface --clients 16 --seconds 5 --stream-frames 100
run frames_blazeface_unbatched 60 python3 bench/frame_throughput.py --device cuda \
  --gpu-jpeg on --detector blazeface --detector-batching off --clients 16 --seconds 5 \
  --stream-frames 100
# Paste-back of a frame's faces: one batched inverse warp against the face-by-face loop.
run paste_batched 40 python3 bench/paste_batched.py --device cuda
run memory 45 python3 bench/memory.py --preset df128 --identities 8 --device cuda
summary
