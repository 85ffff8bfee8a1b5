#!/usr/bin/env bash
# One prepared GPU check (see benchmarks/gpu_check.py and docs/benchmarks.md): on one lent GPU,
# from the repository root of a copy of the working tree,
#
#     bash benchmarks/gpu_check.sh                    # figures into $OUT/gpu_check.json (+ .log)
#     GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh  # every piece at a tiny size on the CPU
#
# GPT-2 124M's CORE against nanochat's published 0.1139 needs OpenAI's weights and the unpacked eval
# bundle on the machine (nothing is downloaded there):
#
#     GPU_CHECK_CORE_MODEL=./gpt2-weights GPU_CHECK_CORE_BUNDLE=./eval_bundle bash benchmarks/gpu_check.sh --only core
#
# Python packages the GPU machine lacks travel as wheels in .whl/ (benchmarks/gpu_check_wheels.sh
# downloads them here); they are installed into a scratch folder, nothing system-wide.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${GPU_CHECK_OUT:-${OUT:-gpu-check}}"
mkdir -p "$out_dir"
if compgen -G ".whl/*.whl" > /dev/null; then
    site=/tmp/gpu-check-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "installing the wheels of .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# The download cache where nothing can be downloaded: a scratch one, unless given.
export GPT2LAB_CACHE="${GPT2LAB_CACHE:-/tmp/gpt2lab-cache}"
export PYTHONUNBUFFERED=1
# The pieces stop starting at GPU_CHECK_BUDGET_S (480 s); this kills a piece that hangs, and the
# JSON written after each finished piece stays.
timeout "${GPU_CHECK_TIMEOUT:-570}" python3 benchmarks/gpu_check.py --out "$out_dir/gpu_check.json" "$@" 2>&1 \
    | tee "$out_dir/gpu_check.log"
