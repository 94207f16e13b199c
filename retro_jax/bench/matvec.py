r"""Weight-bound matmuls in float32 vs bfloat16 weights: is bf16 a decoding lever here?

    python -m retro_jax.bench.matvec                        # batch 1 and 16, 12 layers
    python -m retro_jax.bench.matvec --batch_sizes=1,2,4,8 --width=1024

A decoding step at small batch reads every weight once: its time is the weights' bytes
over the memory bandwidth the matmul reaches. This times ``layers`` weight matrices
``[width, 4 * width]`` times ``[batch, width]`` activations, jitted, three ways: float32
weights, bfloat16 weights with float32 accumulation (``preferred_element_type``), and
bfloat16 weights upcast to float32 before the dot; the median of ``repeats`` calls each.
One process: compare the ratios, not the milliseconds (the machine is noisy).
"""

from __future__ import annotations

from typing import Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.bench.peers import median_seconds


def _dot_f32(x, ws):
  return sum((x @ w).sum() for w in ws)


def _dot_bf16(x, ws):
  return sum(jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32).sum()
             for w in ws)


def _dot_upcast(x, ws):
  return sum((x @ w.astype(jnp.float32)).sum() for w in ws)


def _seconds(fn: Callable, *args, repeats: int) -> float:
  return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def run(batch_sizes: Sequence[int] = (1, 16), *, width: int = 768, layers: int = 12,
        repeats: int = 30, seed: int = 0) -> list[dict]:
  """One row per batch size: milliseconds per call of each variant and their ratios."""
  rng = np.random.default_rng(seed)
  ws32 = [jnp.asarray(rng.standard_normal((width, 4 * width), np.float32))
          for _ in range(layers)]
  ws16 = [w.astype(jnp.bfloat16) for w in ws32]
  f32, bf16, upcast = jax.jit(_dot_f32), jax.jit(_dot_bf16), jax.jit(_dot_upcast)
  rows = []
  for batch in batch_sizes:
    x = jnp.ones((batch, width), jnp.float32)
    t32 = _seconds(f32, x, ws32, repeats=repeats)
    t16 = _seconds(bf16, x, ws16, repeats=repeats)
    tup = _seconds(upcast, x, ws16, repeats=repeats)
    weight_bytes = layers * width * 4 * width * 4
    rows.append(dict(batch=batch, f32_ms=t32 * 1e3, bf16_ms=t16 * 1e3, upcast_ms=tup * 1e3,
                     f32_gb_s=weight_bytes / t32 / 1e9, bf16_speedup=t32 / t16,
                     upcast_speedup=t32 / tup))
  return rows


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  print(f"{jax.devices()[0].device_kind}: {f.layers} x [{f.width}, {4 * f.width}] weights")
  print("| batch | float32 ms (weight GB/s) | bf16 dot ms (x float32) | bf16 upcast ms (x) |")
  print("|---|---|---|---|")
  for r in run([int(b) for b in f.batch_sizes], width=f.width, layers=f.layers,
               repeats=f.repeats):
    print(f"| {r['batch']} | {r['f32_ms']:.2f} ({r['f32_gb_s']:.1f}) | {r['bf16_ms']:.2f} "
          f"({r['bf16_speedup']:.2f}x) | {r['upcast_ms']:.2f} ({r['upcast_speedup']:.2f}x) |")


if __name__ == "__main__":
  flags.DEFINE_list("batch_sizes", ["1", "16"], "Activation rows.")
  flags.DEFINE_integer("width", 768, "Model width; each weight is [width, 4 * width].")
  flags.DEFINE_integer("layers", 12, "Weight matrices per call.")
  flags.DEFINE_integer("repeats", 30, "Timed calls per variant.")
  app.run(main)
