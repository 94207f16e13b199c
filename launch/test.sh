#!/usr/bin/env bash
# Installs test dependencies into .venv and runs the test suite on CPU.
#   bash launch/test.sh            everything (what CI runs)
#   bash launch/test.sh --fast     the fast tier: every test not marked slow (< 3 min)
# Extra arguments go to pytest (e.g. bash launch/test.sh tests/test_model.py -k causality).
# Tests run in RETRO_JAX_TEST_WORKERS processes (pytest-xdist; default: one per core, at
# most 4), each test file in one of them; RETRO_JAX_TEST_WORKERS=0 runs them in this one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
marker=()
if [ "${1:-}" = "--fast" ]; then
  shift
  marker=(-m "not slow")
fi
cores=$(nproc 2>/dev/null || echo 1)
workers=${RETRO_JAX_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile \
  "${marker[@]}" "${@:-tests}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then  # pytest: no tests collected; not a failure.
  echo "pytest collected no tests"
  exit 0
fi
exit "$rc"
