#!/usr/bin/env bash
# Installs runtime dependencies into .venv and runs the miniature InstructRetro recipe
# on the embedded default corpus (CPU is enough). Extra arguments go to the recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m retro_jax.recipe "$@"
