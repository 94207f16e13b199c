#!/usr/bin/env bash
# Installs test dependencies into .venv and runs the test suite on CPU.
#   bash launch/test.sh            everything (what CI runs)
#   bash launch/test.sh --fast     the fast tier: every test not marked slow (< 3 min)
# Extra arguments go to pytest (e.g. bash launch/test.sh tests/test_model.py -k causality).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
marker=()
if [ "${1:-}" = "--fast" ]; then
  shift
  marker=(-m "not slow")
fi
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "${marker[@]}" "${@:-tests}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then  # pytest: no tests collected; not a failure.
  echo "pytest collected no tests"
  exit 0
fi
exit "$rc"
