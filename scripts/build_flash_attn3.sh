#!/usr/bin/env bash
# Build flash-attention 3 (Hopper) for mm's `--attention-kernel flash3` from a source checkout.
#
#   scripts/build_flash_attn3.sh /path/to/flash-attention [--all]
#
# The checkout needs its csrc/cutlass submodule (the CUTLASS headers). Without --all only what the
# DiTs use is compiled: head dims 96 (Open-Sora-Plan) and 128 (Wan, Step-Video), bf16, forward and backward, no paged /
# split / varlen / softcap / fp8 / fp16 variants (a few minutes on 16 cores instead of hours).
# The built package is installed into the current Python environment (pip install --no-build-isolation).
set -euo pipefail
src=${1:?usage: $0 FLASH_ATTENTION_CHECKOUT [--all]}
[ -f "$src/hopper/setup.py" ] || { echo "$src/hopper/setup.py not found: not a flash-attention checkout" >&2; exit 2; }
[ -d "$src/csrc/cutlass/include/cute" ] || {
  echo "$src/csrc/cutlass has no CUTLASS headers: git submodule update --init csrc/cutlass" >&2; exit 2; }
if [ "${2:-}" != "--all" ]; then
  for f in SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 FP8 VARLEN CLUSTER HDIM64 HDIM192 HDIM256 SM80 \
           HDIMDIFF64 HDIMDIFF192; do
    export "FLASH_ATTENTION_DISABLE_$f=TRUE"
  done
fi
export FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-8} NVCC_THREADS=${NVCC_THREADS:-2}
cd "$src/hopper"
python3 -m pip install --no-build-isolation --no-deps -v .
python3 -c "from mm.accelerator.attention_kernels import flash3_problem; print('flash3:', flash3_problem() or 'usable')" || true
