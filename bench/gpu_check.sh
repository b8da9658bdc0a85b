#!/usr/bin/env bash
# The GPU check of bench/throughput.py, as run on a lent H100/H200 (device tool): the machine has torch,
# transformers and lightning, and gets bitsandbytes, datasets and jsonargparse as wheels in .whl
# (`bash ../shared/gpu/wheels.sh pytest pluggy iniconfig`). Runs the `gpu` tests (tests/test_optim.py,
# when pytest is there), times the optimizer step alone (bench/optimizer_step.py: bitsandbytes, the
# plain compensated path, the fused kernel), then the variants. Writes $OUT/gpu_tests.txt,
# $OUT/optimizer_step.txt, $OUT/throughput.json and $OUT/log.txt.
#   bash bench/gpu_check.sh            # the five variants below (five took about 7 minutes on an H100 when
#                                      each timed 768 samples after 256; now one untimed and one timed pass of 1,024)
#   bash bench/gpu_check.sh seed configs/phi3_jp_lora.yaml ...   # or any variants ("peer configs/phi3_jp.yaml":
#                                      HF Trainer with that preset's settings, for the same-settings ratio)
set -uo pipefail
# Defaults: the seed; the 80 GB and 40 GB presets; and the candidates for 4x (bench/RESULTS.md: eager
# forward+backward caps the preset near 3.9x even with no optimizer cost): compiled decoder blocks, with
# one optimizer step per 2 batches (the preset's) and per 4 (which needs a higher learning rate).
if [ $# -eq 0 ]; then
  set -- seed configs/phi3_jp.yaml configs/phi3_jp_40gb.yaml "configs/phi3_jp.yaml --model.compile true" \
    "configs/phi3_jp.yaml --model.compile true --trainer.accumulate_grad_batches 4"
fi
export MBTI_LIGHTNING_CACHE=/tmp/mlc HF_DATASETS_CACHE=/tmp/hfd PYTHONUNBUFFERED=1
python3 -c 'import pyarrow, fsspec, transformers, lightning; print("pyarrow", pyarrow.__version__, "fsspec", fsspec.__version__, "transformers", transformers.__version__, "lightning", lightning.__version__)'
major=$(python3 -c 'import pyarrow; print(pyarrow.__version__.split(".")[0])')
if [ "$major" -lt 24 ] && [ -d .whl_alt ]; then  # datasets 5 needs pyarrow >= 24
  rm -f .whl/datasets-5* .whl/dill-* .whl/multiprocess-*; cp .whl_alt/*.whl .whl/
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if python3 -c 'import pytest' 2>/dev/null; then
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_optim.py 2>&1 | tail -15 | tee "${OUT:-bench/out}/gpu_tests.txt"
fi
python3 bench/optimizer_step.py 2>&1 | tee "${OUT:-bench/out}/optimizer_step.txt"
python3 bench/throughput.py --passes 1 --timeout 240 --out "${OUT:-bench/out}/throughput.json" --variants "$@" 2>&1 | tee "${OUT:-bench/out}/log.txt"
