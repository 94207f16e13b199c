r"""Trainer throughput: tokens/s, step time and MFU of GPT and Retro train steps.

    python -m retro_jax.bench.train                                  # CPU: tiny, 100m
    python -m retro_jax.bench.train --sizes=1b --batch=16 --seq_len=2048 \
        --dtype=bfloat16 --remat_policy=dots                         # one GPU

Each row runs the real ``retro_jax.training.trainer.Trainer`` step (sharded jit over
the mesh, donated state, AdamW with clipping) on synthetic batches
(``retro_jax.data.synthetic``) and reports the median step time after warm-up,
tokens/s, analytic TFLOP/s (``retro_jax.models.flops``) and MFU against the device's
bf16 peak when known. GPT = the decoder alone (retrieval off, decoder parameters only);
Retro = the same decoder with encoder and CCA and k neighbors per chunk.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

from absl import app
from absl import flags
import jax

from retro_jax.data.synthetic import SyntheticRetroSource
from retro_jax.models import RetroConfig, param_count
from retro_jax.models.flops import peak_tflops
from retro_jax.models import partitioning
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.training.trainer import Trainer

SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, mlp_dim=512),
    "100m": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                 mlp_dim=3072),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16,
               mlp_dim=8192),
}


def time_train_step(config: RetroConfig, *, retrieval: bool, batch: int, seq_len: int,
                    steps: int, num_neighbors: int = 2,
                    mesh_shape: Optional[dict] = None, grad_accum_steps: int = 1) -> dict:
  """Times ``steps`` trainer steps after 2 warm-up steps; returns figures of one row."""
  mesh = partitioning.make_mesh(mesh_shape)
  trainer = Trainer(config, OptimizerConfig(warmup_steps=0), train_steps=steps + 2,
                    mesh=mesh, retrieval=retrieval, grad_accum_steps=grad_accum_steps)
  source = SyntheticRetroSource(config.vocab_size, seq_len, batch,
                                chunk_length=config.chunk_length,
                                num_neighbors=num_neighbors, with_neighbors=retrieval)
  batches = [source.get_batch(i) for i in range(2)]
  state = trainer.init_state()
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[i % 2])
    jax.block_until_ready(metrics["loss"])
    if i >= 2:
      times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  flops = trainer.train_flops_per_example(seq_len, num_neighbors) * batch
  peak = peak_tflops(jax.devices()[0].device_kind)
  achieved = flops / step_time
  return dict(params=param_count(state.params), step_s=step_time,
              tokens_s=batch * seq_len / step_time, tflops=achieved / 1e12,
              mfu=None if peak is None else achieved / (peak * 1e12 * jax.device_count()),
              train_flops=flops, loss=float(metrics["loss"] / metrics["weight"]))


def format_row(size: str, name: str, r: dict) -> str:
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  return (f"| {size} | {name} | {r['params'] / 1e6:.1f}M | {r['step_s']:.4f} | "
          f"{r['tokens_s']:.0f} | {r['tflops']:.3f} | {mfu} | {r['ratio']:.2f}x | "
          f"{r['flop_ratio']:.2f}x |")


HEADER = ("| size | model | params | step (s) | tokens/s | TFLOP/s | MFU | step / GPT "
          "| FLOPs / GPT |\n|---|---|---|---|---|---|---|---|---|")


def run_variants(sizes, variants, *, batch: int, seq_len: int, steps: int, dtype: str,
                 remat_policy: str, num_neighbors: int, mesh_shape: Optional[dict] = None,
                 print_fn=print) -> list[dict]:
  """Times each (name, config transform, retrieval) variant per size; first is the base."""
  device = jax.devices()[0]
  print_fn(f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
           f"batch={batch}, seq_len={seq_len}, k={num_neighbors}, dtype={dtype}, "
           f"remat={remat_policy}, steps={steps}")
  print_fn(HEADER)
  rows = []
  for size in sizes:
    base_config = RetroConfig(**SIZES[size], dtype=dtype, remat_policy=remat_policy,
                              encoder_dropout_rate=0.0)
    base = None
    for name, transform, retrieval in variants:
      r = time_train_step(transform(base_config), retrieval=retrieval, batch=batch,
                          seq_len=seq_len, steps=steps, num_neighbors=num_neighbors,
                          mesh_shape=mesh_shape)
      base = base or r
      r.update(size=size, model=name, ratio=r["step_s"] / base["step_s"],
               flop_ratio=r["train_flops"] / base["train_flops"])
      rows.append(r)
      print_fn(format_row(size, name, r))
  return rows


GPT_AND_RETRO = (("GPT", lambda c: c, False), ("Retro", lambda c: c, True))

_SIZES = flags.DEFINE_list("sizes", ["tiny", "100m"], f"Model sizes from {sorted(SIZES)}.")
_BATCH = flags.DEFINE_integer("batch", 2, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per example (a multiple of 64).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
_REMAT = flags.DEFINE_string("remat_policy", "none", "RetroConfig.remat_policy.")
_NEIGHBORS = flags.DEFINE_integer("num_neighbors", 2, "k neighbors per chunk.")


def check_flags() -> None:
  for size in _SIZES.value:
    if size not in SIZES:
      raise app.UsageError(f"--sizes: unknown size {size!r}; known: {sorted(SIZES)}")
  if _SEQ_LEN.value % 64:
    raise app.UsageError(f"--seq_len={_SEQ_LEN.value} must be a multiple of 64")


def run_from_flags(variants) -> list[dict]:
  check_flags()
  return run_variants(_SIZES.value, variants, batch=_BATCH.value, seq_len=_SEQ_LEN.value,
                      steps=_STEPS.value, dtype=_DTYPE.value, remat_policy=_REMAT.value,
                      num_neighbors=_NEIGHBORS.value)


def main(argv):
  del argv
  run_from_flags(GPT_AND_RETRO)


if __name__ == "__main__":
  app.run(main)
