#!/usr/bin/env bash
# One call on a lent CUDA machine (fits the 600 s limit of one call): the host-sync test, the
# gpu-marked tests, the kernels tests compiled, then the kernel throughput table beside ModelOpt /
# torchao and the QAT-step table. Expects wheels of the four packages and of what the machine's
# image lacks in .whl/ (see benchmarks/README.md, "On a GPU"); writes its logs under $OUT (or ./gpu-out).
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__)"
# 1. no device sync in a calibrated quantizer's forward/backward, every format, static and dynamic
timeout 90 python3 -m pytest tests/core/test_no_host_sync.py -q -rs -p no:cacheprovider 2>&1 \
    | tee "$out/sync_test.log"
# 2. the gpu-marked tests, then every kernels test (those not marked gpu run compiled there too)
timeout 200 python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider \
    --deselect tests/core/test_no_host_sync.py 2>&1 | tee "$out/gpu_tests.log"
timeout 100 python3 -m pytest tests/kernels -m "not gpu" -q -p no:cacheprovider 2>&1 \
    | tee "$out/kernels_tests.log"
# 3. throughput (ours, ModelOpt's TensorQuantizer + CUDA extension, its Triton NVFP4, torchao) and
#    one QAT step of a Llama-style block (unquantized, W4A8, NVFP4)
timeout 180 python3 benchmarks/kernel_throughput.py --device cuda --size 8192 --dtypes bf16,fp32 \
    --repeats 20 --qat 2>&1 | tee "$out/kernels_cuda.md"
