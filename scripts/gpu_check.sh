#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU (under 5 minutes): the device tests
# (`pytest -m gpu`: GPU vs CPU outputs, a GPU swarm vs --local on the GPU, LoRA gradients, int8 and
# nf4 through bitsandbytes' CUDA kernels) and the GPU benchmark table (scripts/bench_gpu.py).
#
#   bash scripts/gpu_check.sh            # PY=/path/to/python to choose the interpreter
#
# It uses the first of $PY, .venv/bin/python and python3 whose torch sees a GPU (this project's
# .venv pins a CPU build of torch where no GPU is present: `pip install -e '.[dev]'` in an
# environment with a CUDA build of torch). Its output, with the card's name, goes in the README.
set -uo pipefail
cd "$(dirname "$0")/.."
found=""
for candidate in "${PY:-}" .venv/bin/python python3; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        found="$candidate"; break
    fi
done
if [ -z "$found" ]; then
    echo "gpu_check: no Python here has a torch that sees a GPU (set PY=..., or install a CUDA build of torch)" >&2
    exit 2
fi
if ! "$found" -c "import swarm" 2>/dev/null; then  # not installed: import it from this checkout
    link=$(mktemp -d); ln -s "$PWD" "$link/swarm"; export PYTHONPATH="$link${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$found" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
status=0
echo "== pytest -m gpu"
timeout 210 "$found" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x --timeout 120 || status=1
echo "== scripts/bench_gpu.py"
timeout 80 "$found" scripts/bench_gpu.py --tokens 64 --rounds 3 || status=1
exit $status
