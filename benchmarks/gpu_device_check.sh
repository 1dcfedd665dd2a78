#!/usr/bin/env bash
# The GPU machine's check of the CUDA backend, run from the repository root:
#
#     bash benchmarks/gpu_device_check.sh              # tests on the real GPU, then the full benchmark
#     bash benchmarks/gpu_device_check.sh --quick      # arguments go to benchmarks/gpu.py
#
# 1. the machine: nvidia-smi, Python, numba, numba-cuda (and torch) versions;
# 2. the CUDA kernel tests without the simulator: tests/test_cuda_backend.py, tests/test_backend_contract.py
#    and the CUDA cases of tests/test_{kernels,hs,bf16,direct,large_vocab}.py;
# 3. benchmarks/gpu.py --json $OUT/gpu.json (rnnlm vs PyTorch tokens/s, and the CPU/GPU parity check).
# Every part runs even when an earlier one failed, each under its own time limit (TEST_TIMEOUT,
# BENCH_TIMEOUT seconds); everything is also written to $OUT/log.txt; the exit status is non-zero when
# any part failed. The limits (2 and 3 minutes) keep even a hanging run within about 6 minutes. The package
# is installed there in place, without its dependencies (the machine's own numba and numba-cuda; nothing can
# be fetched there). The machine's image held numba-cuda 0.30.4 with numpy 2.5, which no longer has
# np.row_stack that numba-cuda's array typing registers: a sitecustomize puts it back as np.vstack.

set -u
OUT=${OUT:-/tmp/rnnlm-gpu-check}
TEST_TIMEOUT=${TEST_TIMEOUT:-120}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}
mkdir -p "$OUT"
if ! python3 -c 'import numpy; numpy.row_stack' 2>/dev/null; then
    shim=$(mktemp -d)
    echo 'import numpy; numpy.row_stack = numpy.vstack' >"$shim/sitecustomize.py"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "(rnnlm not installed: tests of rnnlm.cli fail)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NUMBA_ENABLE_CUDASIM=0
export PYTHONUNBUFFERED=1

failed=()
part() {  # part NAME TIMEOUT COMMAND...: run, report, remember a failure
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name: $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    if [ "$status" -eq 0 ]; then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        [ "$status" -eq 124 ] && echo "=== $name: timed out after $limit s"
        echo "=== $name: FAILED (exit $status, $((SECONDS - start)) s)"
        failed+=("$name")
    fi
}

main() {
    part machine 60 bash -c 'nvidia-smi; python3 --version; python3 - <<EOF
import importlib.metadata as md
for name in ("numpy", "numba", "numba-cuda", "cuda-bindings", "cuda-core", "torch", "pytest"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
from numba import cuda
device = cuda.get_current_device()
print("numba.cuda device:", device.name, "compute capability", device.compute_capability)
EOF'
    part kernel-tests "$TEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider -W ignore \
        tests/test_cuda_backend.py tests/test_backend_contract.py
    part cuda-cases "$TEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider -W ignore -k cuda \
        tests/test_kernels.py tests/test_hs.py tests/test_bf16.py tests/test_direct.py tests/test_large_vocab.py
    part benchmark "$BENCH_TIMEOUT" python3 benchmarks/gpu.py --json "$OUT/gpu.json" "$@"

    echo
    if [ ${#failed[@]} -eq 0 ]; then
        echo "all parts passed; log and results in $OUT"
        return 0
    fi
    echo "FAILED parts: ${failed[*]}; log in $OUT/log.txt"
    return 1
}

main "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
