r"""Can CCA learn a lookup? Associative recall through the neighbors, from scratch.

    python -m retro_jax.bench.cca_recall                               # the miniature
    python -m retro_jax.bench.cca_recall --set=encoder_hidden_size=128 --train_steps=1000
    python -m retro_jax.bench.cca_recall --set=cca_layers=(1,2,3,4) --pairs=1
    python -m retro_jax.bench.cca_recall --pairs_in=prompt          # the control

Trains a Retro model (``--size`` from ``bench.forward.SIZES``, fields changed with
``--set``) with every parameter on ``KeyValueRecallSource`` batches: chunk 0's neighbors
hold key-value pairs and chunk 1 asks for values by key, so the answers are only in
the encoder. Every ``--eval_every`` steps it scores the values of held-out batches
three ways: with their own neighbors, with another example's neighbors (the same
keys' distribution, the wrong pairs) and with the neighbors masked (CCA off). A model
whose CCA route carries a lookup drives the first towards zero loss and full accuracy
while the other two stay at a guess; one that only learns the values' bag reaches
log(k * pairs). ``--pairs_in=prompt`` is the control: the same pairs in chunk 0, read
by the decoder's self-attention. Prints one markdown row per evaluation.

This is the miniature's question behind issue 19 (InstructRetro does not answer
through CCA, docs/benchmarks.md): is the architecture at that width able to copy a
looked-up value at all, and how many steps does it take?
"""

from __future__ import annotations

import ast
import dataclasses
import time
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from retro_jax.bench import forward as forward_bench
from retro_jax.data.synthetic import KeyValueRecallSource
from retro_jax.evaluation.analyses import ListSource
from retro_jax.models import RetroConfig, partitioning
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.training.trainer import Trainer

MODES = ("own neighbors", "other example's", "masked")


def parse_overrides(items: Sequence[str]) -> dict:
  """``['encoder_hidden_size=128', 'cca_layers=(1,2,3,4)']`` -> RetroConfig fields."""
  fields = {f.name for f in dataclasses.fields(RetroConfig)}
  overrides = {}
  for item in items:
    name, sep, text = item.partition("=")
    name = name.strip()
    if not sep or name not in fields:
      raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD a RetroConfig "
                       "field")
    try:
      overrides[name] = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      overrides[name] = text.strip()   # a bare string such as rope
  return overrides


def eval_sources(source: KeyValueRecallSource, count: int) -> dict[str, ListSource]:
  """``count`` held-out batches (steps far past any run's) in each of ``MODES``."""
  own = [source.get_batch(10**6 + i) for i in range(count)]
  return {
      MODES[0]: ListSource(own),
      MODES[1]: ListSource([
          dict(b, neighbor_tokens=np.roll(b["neighbor_tokens"], 1, axis=0)) for b in own]),
      MODES[2]: ListSource([dict(b, neighbor_mask=np.zeros_like(b["neighbor_mask"]))
                            for b in own]),
  }


def run(size: str = "miniature", overrides: dict | None = None, *, steps: int = 1500,
        batch: int = 16, pairs: int = 4, pairs_in: str = "neighbors",
        learning_rate: float = 3e-3,
        warmup_steps: int = 50, eval_every: int = 100, eval_count: int = 2,
        seed: int = 0, print_fn=print) -> list[dict]:
  """Trains and evaluates; returns one dict per evaluation (loss and accuracy per mode)."""
  config = RetroConfig(**dict(forward_bench.SIZES[size], **(overrides or {})))
  source = KeyValueRecallSource(config.vocab_size, batch,
                                chunk_length=config.chunk_length,
                                num_neighbors=config.num_neighbors,
                                neighbor_length=config.neighbor_length,
                                pairs_per_neighbor=pairs, pairs_in=pairs_in, seed=seed)
  held_out = eval_sources(source, eval_count)
  trainer = Trainer(config, OptimizerConfig(learning_rate=learning_rate,
                                            warmup_steps=warmup_steps),
                    train_steps=steps, mesh=partitioning.make_mesh(None), seed=seed)
  state = trainer.init_state()
  guess = float(np.log(source.num_values))
  bag = float(np.log(config.num_neighbors * pairs))
  print_fn(f"{size} {overrides or {}}, pairs in the {pairs_in}: {source.num_values} "
           f"values (a guess: {guess:.2f} nats), {config.num_neighbors} x {pairs} pairs "
           f"(their bag: {bag:.2f} nats); batch {batch}, lr {learning_rate}")
  print_fn("| step | " + " | ".join(f"{m}: loss, acc" for m in MODES) + " | s |")
  print_fn("|---|" + "---|" * (len(MODES) + 1))
  rows, start = [], time.perf_counter()
  for step in range(1, steps + 1):
    state, _ = trainer.train_step(state, source.get_batch(step - 1))
    if step % eval_every and step != steps:
      continue
    row = {"step": step}
    for mode in MODES:
      scores = trainer.evaluate(state.params, held_out[mode], eval_count)
      row[mode] = (scores["loss"], scores["accuracy"])
    row["seconds"] = time.perf_counter() - start
    rows.append(row)
    print_fn(f"| {step} | " + " | ".join(f"{row[m][0]:.3f}, {100 * row[m][1]:.1f}%"
                                         for m in MODES) + f" | {row['seconds']:.0f} |")
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  if f.size not in forward_bench.SIZES:
    raise app.UsageError(f"--size={f.size!r}: one of {sorted(forward_bench.SIZES)}")
  try:
    overrides = parse_overrides(f.set)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  run(f.size, overrides, steps=f.train_steps, batch=f.batch_size, pairs=f.pairs,
      pairs_in=f.pairs_in, learning_rate=f.learning_rate, eval_every=f.eval_every,
      seed=f.seed)


if __name__ == "__main__":
  # Flags are defined only when run as a program: bench modules share one flag
  # namespace when a process imports several (the tests).
  flags.DEFINE_string("size", "miniature", "A size of bench.forward.SIZES.")
  flags.DEFINE_multi_string("set", [], "RetroConfig FIELD=VALUE (repeatable).")
  flags.DEFINE_integer("train_steps", 1500, "Training steps.")
  flags.DEFINE_integer("batch_size", 16, "Examples per step (two chunks each).")
  flags.DEFINE_integer("pairs", 4, "Key-value pairs in each neighbor.")
  flags.DEFINE_enum("pairs_in", "neighbors", ["neighbors", "prompt"],
                    "Where the pairs are: the neighbors (CCA) or chunk 0.")
  flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (cosine decay).")
  flags.DEFINE_integer("eval_every", 100, "Steps between evaluations.")
  flags.DEFINE_integer("seed", 0, "Data and initialisation seed.")
  app.run(main)
