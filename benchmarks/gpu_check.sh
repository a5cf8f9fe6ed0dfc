#!/usr/bin/env bash
# One call on a lent CUDA machine: the gpu-marked tests, then the kernel throughput table.
# Expects wheels of the four packages and of what the machine's image lacks in .whl/
# (see benchmarks/README.md, "On a GPU"); writes its logs under $OUT (or ./gpu-out).
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__)"
# the gpu-marked tests, then every kernels test (those not marked gpu run compiled there too)
timeout 300 python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
timeout 300 python3 -m pytest tests/kernels -m "not gpu" -q -p no:cacheprovider 2>&1 \
    | tee "$out/kernels_tests.log"
timeout 200 python3 benchmarks/kernels.py --device cuda --size 8192 --dtypes bf16,fp32 \
    --repeats 20 2>&1 | tee "$out/kernels_cuda.md"
