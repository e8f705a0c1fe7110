#!/usr/bin/env bash
# Run on the GPU machine, from the repository root, with .gpu/ carried (see cuda_ext/GPU.md):
#   bash cuda_ext/gpu_suite.sh [tests|bench|all]
# tests: the CUDA kernel tests (fake-quant and VQ) and the GPU pipeline smoke tests; bench: the kernel and
# calibration benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export OMNIQ_MODELS_DIR=$PWD/.gpu/models OMNIQ_DATA_DIR=$PWD/.gpu/data
gguf=.gpu/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -d .gpu-smollm2-a ] && [ -d .gpu-smollm2-b ] && [ ! -f "$gguf" ]; then
  mkdir -p "$(dirname "$gguf")" && cat .gpu-smollm2-a/part-* .gpu-smollm2-b/part-* > "$gguf"
fi
out=${OUT:-/tmp/omniq-gpu-out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_ext.py tests/test_gpu_pipeline.py tests/test_vptq.py -k "cuda or kernel or gpu" 2>&1 | tee "$out/gpu-tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/fake_quant.py 2>&1 | tee "$out/fake_quant.log" | tail -30
  python3 benchmarks/calibration.py 2>&1 | tee "$out/calibration.log" | tail -30
  python3 benchmarks/vq_kernels.py 2>&1 | tee "$out/vq_kernels.log" | tail -30
fi
exit $status
