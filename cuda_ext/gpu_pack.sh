#!/usr/bin/env bash
# Gather what a GPU session needs into .gpu/ (git-ignored), to be carried to the GPU machine, which reaches no
# package registry: wheels its image lacks (hydra-core, omegaconf, antlr4, gguf; wandb with --with-wandb),
# the tiny test model and the data files the GPU suite reads. See cuda_ext/GPU.md for the whole session.
#   bash cuda_ext/gpu_pack.sh [--with-wandb] [--smollm2]
# --smollm2 also splits SmolLM2's 98 MB GGUF into .gpu-smollm2-{a,b}/ (each under the 64 MiB carry limit;
# carried in two calls, see GPU.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${OMNIQ_MODELS_DIR:-../shared/models}
DATA=${OMNIQ_DATA_DIR:-../shared/data}
PY=${PYTHON:-python3}
WITH_WANDB=0; SMOLLM2=0
for arg in "$@"; do
  case $arg in
    --with-wandb) WITH_WANDB=1 ;;
    --smollm2) SMOLLM2=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

rm -rf .gpu && mkdir -p .gpu/whl .gpu/models .gpu/data
# The device image runs CPython 3.12 on x86_64 (manylinux); pure-Python wheels are all these need.
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl "$@"
}
download hydra-core==1.3.2 omegaconf==2.3.0 gguf==0.19.0
"$PY" -m pip wheel -q --no-deps -w .gpu/whl antlr4-python3-runtime==4.9.3  # published as an sdist only
if [ "$WITH_WANDB" = 1 ]; then
  download wandb==0.31.0 cwevals==0.0.1b1 pydantic pydantic-core annotated-types typing-inspection platformdirs \
    opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common \
    opentelemetry-proto opentelemetry-semantic-conventions googleapis-common-protos
fi

cp -r "$MODELS/stories260K" .gpu/models/
for f in wikitext2/test.raw.txt wikitext2/valid.tokens.txt ptb/ptb.test.txt ptb/ptb.valid.txt tinystories/valid.sample.txt; do
  mkdir -p ".gpu/data/$(dirname "$f")" && cp "$DATA/$f" ".gpu/data/$f"
done
if [ "$SMOLLM2" = 1 ]; then
  gguf="$MODELS/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
  rm -rf .gpu-smollm2-a .gpu-smollm2-b && mkdir -p .gpu-smollm2-a .gpu-smollm2-b
  split -b 50M "$gguf" .gpu-smollm2-a/part-
  mv .gpu-smollm2-a/part-ab .gpu-smollm2-b/
fi

tree_mib=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
pack_mib=$(du -sb .gpu | cut -f1)
echo "tree $((tree_mib / 1048576)) MiB + .gpu $((pack_mib / 1048576)) MiB (the carry limit is 64 MiB in all)"
if [ $((tree_mib + pack_mib)) -gt $((64 * 1048576)) ]; then
  echo "too large to carry: drop --with-wandb or data files" >&2
  exit 1
fi
