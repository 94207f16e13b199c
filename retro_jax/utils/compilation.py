"""Compiler options of the jitted programs that run a model forward only.

XLA:CPU fuses attention's softmax into the dot that follows it (a YNNPACK library
fusion). In a forward pass such a program keeps ~1.3 of 2 cores busy; compiled without
library fusions, the miniature's evaluation forward pass runs 1.3x (GPT) to 1.45x
(Retro) faster and a Retro prefill 1.25x, with the same sums to the bit. Training
steps (their softmax is kept for the backward pass), decoding steps and the MiniLM
embedder do not gain, so only forward programs of the LM (evaluation, generation's
prefill) take these options; other backends get none. Figures: docs/benchmarks.md,
"Miniature recipe".
"""

from __future__ import annotations

import jax

# An empty list of YNNPACK fusion types: XLA:CPU's own fusions only.
_CPU_FORWARD_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def forward_compiler_options() -> dict[str, str]:
  """``jax.jit(..., compiler_options=)`` for a forward-only program on this backend."""
  return dict(_CPU_FORWARD_OPTIONS) if jax.default_backend() == "cpu" else {}
