#!/usr/bin/env bash
# The GPU checks of the hot path in one run (a lent GPU's time is short: the steps' timeouts add up to 570 s, under
# the device tool's 600 s per call, so one call returns every file that was written).
# From the repository root, on a machine with CUDA and PyTorch:
#
#     OUT=/some/dir bash benchmarks/cuda_check.sh
#
# The peers (ASDL, pytorch-optimizer, heavyball, psgd-torch) are timed where installed; wheels placed in .whl/ are
# installed first (where nothing can be downloaded). Writes ten files into $OUT: machine.txt, tests.log (the CUDA
# tests: host synchronisations per step by set_sync_debug_mode, GPU = CPU gradients in float64, event timings, bf16),
# overhead.log / overhead-cuda.json, refresh.log / refresh-cuda.json, host.log / host-cuda.json (per-layer cost at
# width 16), peers.log / peers-cuda.json.
set -uo pipefail
OUT=${OUT:-benchmarks/results/cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/cuda-check-site .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/cuda-check-site"
fi
$PY - <<'PY' 2>&1 | tee "$OUT/machine.txt" || exit 1
import torch, lightning
assert torch.cuda.is_available(), "no CUDA device here"
print("torch", torch.__version__, "lightning", lightning.__version__, torch.cuda.get_device_name(0))
PY
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py 2>&1 | tee "$OUT/tests.log"
timeout 200 $PY benchmarks/overhead.py --device cuda --out "$OUT/overhead-cuda.json" 2>&1 | tee "$OUT/overhead.log"
timeout 60 $PY benchmarks/refresh.py --device cuda --out "$OUT/refresh-cuda.json" 2>&1 | tee "$OUT/refresh.log"
timeout 60 $PY benchmarks/host.py --device cuda --out "$OUT/host-cuda.json" 2>&1 | tee "$OUT/host.log"
timeout 100 $PY benchmarks/peers.py --device cuda --setting 256 --out "$OUT/peers-cuda.json" 2>&1 | tee "$OUT/peers.log"
