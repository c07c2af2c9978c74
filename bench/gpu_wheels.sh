#!/usr/bin/env bash
# Prepare, on a machine with a package index, what bench/gpu.sh needs on a GPU machine that has
# CUDA torch, torchvision, numpy, OpenCV, scikit-image and pytest but no network: the wheels
# of facemux's other dependencies (Python 3.12, manylinux x86-64) and the 5-point landmark
# model, in .whl/ (git-ignored; about 40 MB). bench/gpu.sh installs them when .whl/ exists.
#
#   bash bench/gpu_wheels.sh     # then ship .whl/ beside the checkout and run bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl/site/face_recognition_models/models
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  "protobuf>=7.35.1,<8" "c2pa-python>=0.38,<0.39" dlib-bin==20.0.1.post1 \
  safetensors prometheus-client nvidia-ml-py cryptography cffi pytest-timeout
# face_recognition_models is a 100 MB sdist; facemux's default 5-point predictor is 9 MB of it.
src=$("$py" -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('face_recognition_models').origin))")
cp "$src/__init__.py" .whl/site/face_recognition_models/
cp "$src/models/shape_predictor_5_face_landmarks.dat" .whl/site/face_recognition_models/models/
du -sh .whl
