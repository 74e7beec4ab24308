#!/usr/bin/env bash
# Everything a lent GPU machine is for, in as few calls as its 10-minute limit allows: build the CUDA kernels,
# run the tests that need a GPU, run the CUDA benchmarks. Logs, JUnit XML and pytest-benchmark JSON go to $OUT
# (the device tool's folder; ./gpu-out elsewhere), at most 8 files as that tool returns, and the last lines
# printed are the ones to read.
#
# Phases, run in the order given:
#   env       nvidia-smi, torch/triton versions, the measured device-to-device copy bandwidth (the floor's rate)
#   build     pip install -e . with the CUDA kernels (HIERKERN_CUDA_ARCHS, default 90a: the lent GPUs are Hopper)
#   test      the GPU test files (CUDA and Triton backends, layers, trainer), then compute-sanitizer (-m slow)
#   test-all  the whole suite on the GPU machine
#   bench     pytest benchmarks on CUDA (HK_SIZE, default large) and the report table
#
# A first call:  bash benchmarks/gpu_session.sh env build test
# A second one:  bash benchmarks/gpu_session.sh env build bench   (a fresh machine rebuilds; a warm one reuses)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python=python3
status=0

run_phase() {  # name, command...: tees the phase's output to $OUT/<name>.log, remembers a failure
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [[ $rc -eq 0 ]] || status=1
    return "$rc"
}

phase_env() {
    run_phase env bash -c "nvidia-smi; $python - <<'PY'
import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')
src = torch.empty(2**30, dtype=torch.uint8, device='cuda')
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    dst.copy_(src)
end.record()
torch.cuda.synchronize()
seconds = start.elapsed_time(end) / 1e3 / 20
print(f'device-to-device copy of 1 GiB: {2 * src.numel() / seconds / 1e12:.2f} TB/s (read + write)')
PY"
}

phase_build() {
    HIERKERN_CUDA_ARCHS="${HIERKERN_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}" \
        run_phase build bash -c "$python -m pip install --no-build-isolation --no-deps -e . && $python -c \
'import hierkern; print(\"cuda backends:\", hierkern.available_backends(\"cuda\"))'" || exit 1
}

phase_test() {
    run_phase test "$python" -m pytest -q -p no:cacheprovider -m "not slow" --junitxml="$OUT/tests.xml" \
        tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_mha.py tests/test_encoder.py \
        tests/test_train.py
    run_phase sanitizer "$python" -m pytest -q -p no:cacheprovider -m slow tests/test_cuda_backend.py
}

phase_test_all() {
    run_phase test-all "$python" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" tests
}

phase_bench() {
    local json="$OUT/results-cuda.json"
    run_phase bench "$python" -m pytest -q -p no:cacheprovider benchmarks --hk-device=cuda \
        --hk-size="${HK_SIZE:-large}" --benchmark-json="$json"
    [[ -f $json ]] && "$python" -m hierkern.bench report "$json" --detail | tee "$OUT/table.txt"
}

[[ $# -gt 0 ]] || set -- env build test
for phase in "$@"; do
    case $phase in
        env) phase_env ;;
        build) phase_build ;;
        test) phase_test ;;
        test-all) phase_test_all ;;
        bench) phase_bench ;;
        *) echo "unknown phase '$phase' (env, build, test, test-all, bench)" >&2; exit 2 ;;
    esac
done
echo "=== files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
