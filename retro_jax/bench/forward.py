r"""Evaluation forward pass and train step, with and without the forward compiler options.

    python -m retro_jax.bench.forward                      # the miniature recipe's model
    python -m retro_jax.bench.forward --sizes=tiny,100m --batch=4 --seq_len=512

``utils.compilation.forward_compiler_options`` compiles forward-only programs without
XLA:CPU's library (YNNPACK) fusions. This times, for GPT (retrieval off) and Retro
(k neighbors), the evaluator's jitted loss sums and the trainer's train step, each
compiled both ways (``jax.jit(..., compiler_options=)``), in one process with the two
variants interleaved: the median of ``repeats`` calls each. Compare the ratios, not the
seconds (the machine is noisy). On a GPU the options are empty and both columns run the
same program.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
import jax

from retro_jax.bench import train as train_bench
from retro_jax.data.synthetic import SyntheticRetroSource
from retro_jax.models import RetroConfig, RetroLM, partitioning
from retro_jax.models.lm import init_params
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.training.trainer import Trainer, batch_to_global
from retro_jax.utils.compilation import forward_compiler_options

# The miniature recipe's model (gin/miniature/model.gin), besides bench.train's sizes.
SIZES = dict(train_bench.SIZES, miniature=dict(
    vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, mlp_dim=512,
    position_embedding="rope", cca_layers=(2, 4), encoder_num_layers=2,
    encoder_hidden_size=64, encoder_position_embedding="rope", encoder_dropout_rate=0.0))


def _interleaved(calls: Sequence[Callable[[], None]], repeats: int) -> list[float]:
  """Median seconds of each call (which waits for its result), timed in rounds of one
  call each after a warm-up round."""
  for call in calls:
    call()
  times = [[] for _ in calls]
  for _ in range(repeats):
    for i, call in enumerate(calls):
      start = time.perf_counter()
      call()
      times[i].append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def run(sizes: Sequence[str] = ("miniature",), *, batch: int = 16, seq_len: int = 256,
        num_neighbors: int = 2, repeats: int = 8) -> list[dict]:
  """One row per size, model and program: seconds by default and with the options."""
  options = forward_compiler_options()
  mesh = partitioning.make_mesh(None)
  rows = []
  for size in sizes:
    config = RetroConfig(**SIZES[size])
    for model, retrieval in (("GPT", False), ("Retro", True)):
      source = SyntheticRetroSource(config.vocab_size, seq_len, batch,
                                    chunk_length=config.chunk_length,
                                    num_neighbors=num_neighbors, with_neighbors=retrieval)
      lm = RetroLM(config, retrieval=retrieval)
      params = init_params(config, jax.random.PRNGKey(0))
      data = batch_to_global(source.get_batch(0), partitioning.batch_sharding(mesh),
                             retrieval)
      forward = [jax.jit(lm.loss_sums, compiler_options=o) for o in ({}, options)]
      seconds = _interleaved([lambda f=f: jax.block_until_ready(f(params, data))
                              for f in forward], repeats)
      rows.append(dict(size=size, model=model, program="evaluation forward",
                       default_s=seconds[0], options_s=seconds[1]))
      trainer = Trainer(config, OptimizerConfig(warmup_steps=0,
                                                trainable="retro" if retrieval else "all"),
                        train_steps=repeats + 1, mesh=mesh, retrieval=retrieval)
      state = [trainer.init_state()]
      # The trainer's own step function and shardings, compiled both ways.
      steps = [jax.jit(trainer._train_step_fn,  # pylint: disable=protected-access
                       in_shardings=(trainer.state_shardings, trainer.batch_sharding),
                       out_shardings=(trainer.state_shardings, None), donate_argnums=(0,),
                       compiler_options=o) for o in ({}, options)]

      def train(step):
        with partitioning.activation_sharding(mesh, trainer.rules):
          state[0], metrics = step(state[0], data)
        jax.block_until_ready(metrics["loss"])
      seconds = _interleaved([lambda s=s: train(s) for s in steps], repeats)
      rows.append(dict(size=size, model=model, program="train step",
                       default_s=seconds[0], options_s=seconds[1]))
  for row in rows:
    row["speedup"] = row["default_s"] / row["options_s"]
  return rows


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  unknown = [s for s in f.sizes if s not in SIZES]
  if unknown:
    raise app.UsageError(f"--sizes: unknown {unknown}; known: {sorted(SIZES)}")
  print(f"{jax.devices()[0].device_kind}: batch {f.batch} x {f.seq_len} tokens, "
        f"options {forward_compiler_options() or 'none (not CPU)'}")
  print("| size | model | program | default s | forward options s | speedup |")
  print("|---|---|---|---|---|---|")
  for r in run(f.sizes, batch=f.batch, seq_len=f.seq_len, num_neighbors=f.num_neighbors,
               repeats=f.repeats):
    print(f"| {r['size']} | {r['model']} | {r['program']} | {r['default_s']:.4f} | "
          f"{r['options_s']:.4f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
  # bench.train, imported above, defines --sizes, --batch, --seq_len and
  # --num_neighbors (one flag namespace per process); this program's defaults differ.
  for name, default in (("sizes", ["miniature"]), ("batch", 16), ("seq_len", 256)):
    flags.FLAGS.set_default(name, default)
  flags.DEFINE_integer("repeats", 8, "Timed calls per variant.")
  app.run(main)
