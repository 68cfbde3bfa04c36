#!/usr/bin/env bash
# GPU check from a clone, install included: nnUNetTrainerLandmark against plain nnU-Net at MM-WHS size on one
# NVIDIA GPU, with nnU-Net's CUDA defaults. About 11 minutes on an H200 with 16 cores (measured: benchmarks/results/RESULTS.md).
#
#   bash benchmarks/gpu_check.sh                 # venv .venv-gpu-check (reuses an installed CUDA torch), then the check
#   bash benchmarks/gpu_check.sh --no-install    # the current python environment as it is
#   bash benchmarks/gpu_check.sh --dry-run       # CPU: tiny phantoms, small configuration (the test suite runs this)
#
# Other arguments go to benchmarks/gpu_check.py (--workdir DIR, --iterations N, ...). Prints one table and exits
# non-zero when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
install=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-install" ]; then install=0; else args+=("$a"); fi
done
start=$(date +%s)
PY="${PYTHON:-python3}"
if [ "$install" = 1 ]; then
  # --system-site-packages: a CUDA build of torch that the machine already has is kept (it matches the driver);
  # without one, pip installs torch from PyPI
  [ -x .venv-gpu-check/bin/python ] || "$PY" -m venv --system-site-packages .venv-gpu-check
  . .venv-gpu-check/bin/activate
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet .
  echo "installed in $(( $(date +%s) - start )) s"
  PY=python
fi
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
set +e
"$PY" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
status=$?
set -e
echo "gpu_check finished in $(( $(date +%s) - start )) s with exit status $status"
exit $status
