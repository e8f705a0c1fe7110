#!/usr/bin/env bash
# Run on the GPU machine, from the repository root, with .gpu/ carried (see cuda_ext/GPU.md):
#   bash cuda_ext/gpu_suite.sh [build] [tests] [bench] [vq] [smollm2] [all]
# build: JIT-compile the fused extension once (timed; the cache lives in .gpu-build/, which stays on a warm
# machine between calls); tests: the CUDA kernel tests (fake-quant and VQ) and the stories260K GPU pipeline
# tests; bench: the kernel and calibration benchmarks; vq: the VQ kernels' tests and timings alone; smollm2:
# the SmolLM2 GPU pipeline tests (needs both GGUF halves). Every stage has its own time limit, so one stage that hangs leaves the others' results, and
# every log lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
stages=${*:-all}
[ "$stages" = all ] && stages="build tests bench smollm2"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export OMNIQ_MODELS_DIR=$PWD/.gpu/models OMNIQ_DATA_DIR=$PWD/.gpu/data
export TORCH_EXTENSIONS_DIR=$PWD/.gpu-build/torch_extensions TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$TORCH_EXTENSIONS_DIR"
gguf=.gpu/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -d .gpu-smollm2-a ] && [ -d .gpu-smollm2-b ] && [ ! -f "$gguf" ]; then
  mkdir -p "$(dirname "$gguf")" && cat .gpu-smollm2-a/part-* .gpu-smollm2-b/part-* > "$gguf"
fi
out=${OUT:-/tmp/omniq-gpu-out}; mkdir -p "$out"
status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, keep the first failure
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}
PYTEST="python3 -m pytest -q -p no:cacheprovider -rfEs"

for s in $stages; do
  case $s in
    build)
      { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
        python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
        nvcc --version | tail -1; nproc; } 2>&1 | tee "$out/machine.log"
      stage build 200 python3 -c "
import logging, time
logging.basicConfig(level=logging.INFO)
from omniq_lightning.quant import cuda
t = time.perf_counter(); ext = cuda.load_extension()
print('extension:', cuda.status(), f'{time.perf_counter() - t:.1f} s')
raise SystemExit(0 if ext is not None else 1)"
      tail -3 "$out/build.log" ;;
    tests)
      stage kernel-tests 150 $PYTEST tests/test_cuda_ext.py tests/test_vptq.py -k "cuda or kernel"
      tail -15 "$out/kernel-tests.log"
      stage pipeline-tests 180 $PYTEST tests/test_gpu_pipeline.py -k "not smollm2"
      tail -15 "$out/pipeline-tests.log" ;;
    bench)
      stage fake_quant 60 python3 benchmarks/fake_quant.py
      tail -13 "$out/fake_quant.log"
      stage calibration-w4a16 120 python3 benchmarks/calibration.py --quant w4a16 --epochs 2
      grep -E "^device|^\||speedup" "$out/calibration-w4a16.log" | tail -5
      stage vq_kernels 90 python3 benchmarks/vq_kernels.py
      grep -E "^device|^\|" "$out/vq_kernels.log"
      stage calibration-w4a4 120 python3 benchmarks/calibration.py --quant w4a4 --epochs 2
      grep -E "^device|^\||speedup" "$out/calibration-w4a4.log" | tail -5 ;;
    vq)  # the VQ kernels alone: their tests and timings (for work on cuda_ext/vq.cuh)
      stage vq-tests 90 $PYTEST tests/test_vptq.py -k kernel
      tail -5 "$out/vq-tests.log"
      stage vq_kernels 90 python3 benchmarks/vq_kernels.py
      grep -E "^device|^\|" "$out/vq_kernels.log" ;;
    smollm2)
      if [ ! -f "$gguf" ]; then echo "SmolLM2's GGUF is not here: carry .gpu-smollm2-a and -b (GPU.md)"; status=1; continue; fi
      stage smollm2-tests 300 $PYTEST tests/test_gpu_pipeline.py -k smollm2
      tail -15 "$out/smollm2-tests.log" ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
exit $status
