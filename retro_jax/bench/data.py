r"""Data pipeline throughput: batches with neighbors vs what a train step consumes.

    python -m retro_jax.bench.data                          # synthetic DB, tiny + 8B shapes
    python -m retro_jax.bench.data --retrieval_dir=/data/retro --seq_length=2048

Rows time ``retro_jax.data.batches.TaskBatchSource.get_batch`` (the trainer's batch source:
stream permutation, query-DB chunks, neighbor-map rows, retrieval-DB gathers of chunk +
continuation, the feature converter) on one host and one core, at fresh steps, with the
files in the page cache. Shapes: the tiny model's (``gin/models/tiny.gin``) and the
InstructRetro 8B's (seq 4096, m 64, k 2, r 128, int32 tokens for its 256k vocabulary),
plus the tf.data path (``TaskBatchSource.dataset``) and SFT examples (tokenized on
access). Without ``--retrieval_dir`` the DBs are synthetic (random tokens and neighbor
ids, ~2% missing): the cost does not depend on what the tokens say.

Then it times the tiny model's train step on the same machine
(``retro_jax.bench.train.time_train_step``) and reports the ratio (target >= 10x), and
works out what an 8B host needs: FLOPs per example from ``gin/models/instructretro_8b.gin``
and ``retro_jax.models.flops``, a per-GPU rate at an assumed MFU on an H100, the rate of
an 8-GPU host, and the cores of this pipeline that rate takes.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Optional

from absl import app
from absl import flags
import gin
import numpy as np

from retro_jax.bench import train as train_bench
from retro_jax.data import batches
from retro_jax.data import instructions
from retro_jax.data import tasks
from retro_jax.data import vocab as vocab_lib
from retro_jax.models import RetroConfig
from retro_jax.models.flops import count_flops
from retro_jax.retrieval import formats
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.utils import gin_utils

HEADER = ("| pipeline | n | k | batch | batches | seconds | examples/s | tokens/s | "
          "neighbor tokens/s |\n|---|---|---|---|---|---|---|---|---|")


def build_synthetic_layout(root: str, *, vocab_size: int, query_chunks: int,
                           db_chunks: int, chunk_size: int = 64, k: int = 2,
                           missing: float = 0.02, seed: int = 0) -> RetrievalLayout:
  """A prepared directory of random documents (1-32 chunks each) and neighbor ids."""
  layout = RetrievalLayout(root)
  if os.path.exists(layout.config_path):
    return layout
  rng = np.random.default_rng(seed)
  dtype = formats.token_dtype(vocab_size)

  def documents(chunks: int):
    left = chunks
    while left > 0:
      size = min(left, int(rng.integers(1, 33)))
      left -= size
      yield rng.integers(2, vocab_size, size * chunk_size).astype(dtype)

  os.makedirs(layout.retrieval_db_dir, exist_ok=True)
  os.makedirs(layout.split_db_dir("train"), exist_ok=True)
  formats.write_chunk_db(layout.retrieval_db_prefix, documents(db_chunks), dtype=dtype,
                         pad_id=0, chunk_size=chunk_size, retrieval_db=True)
  query = formats.write_chunk_db(layout.split_db_prefix("train"), documents(query_chunks),
                                 dtype=dtype, pad_id=0, chunk_size=chunk_size)
  ids = rng.integers(0, db_chunks, (query.num_chunks, k))
  ids[rng.random(ids.shape) < missing] = -1
  os.makedirs(layout.neighbors_dir("train"), exist_ok=True)
  formats.write_neighbor_map(layout.neighbor_map_path("train"), ids)
  layout.write_config({"chunk_size": chunk_size, "k": k, "pad_id": 0,
                       "vocab_size": vocab_size, "synthetic": True})
  return layout


def time_batches(get_batch: Callable[[int], dict], steps: int, warmup: int = 1) -> float:
  """Seconds for ``steps`` fresh batches after ``warmup`` untimed ones."""
  for step in range(warmup):
    get_batch(step)
  start = time.perf_counter()
  for step in range(warmup, warmup + steps):
    get_batch(step)
  return time.perf_counter() - start


def _row(name: str, n: int, batch: int, steps: int, seconds: float, *, k: int = 0,
         neighbor_tokens: int = 0) -> dict:
  """``neighbor_tokens``: gathered neighbor tokens per example (l * k * r)."""
  examples = batch * steps / seconds
  return dict(pipeline=name, n=n, k=k, batch=batch, steps=steps, seconds=seconds,
              examples_s=examples, tokens_s=examples * n,
              neighbor_tokens_s=examples * neighbor_tokens)


def format_row(r: dict) -> str:
  return (f"| {r['pipeline']} | {r['n']} | {r['k']} | {r['batch']} | {r['steps']} | "
          f"{r['seconds']:.3f} | {r['examples_s']:,.0f} | {r['tokens_s']:,.0f} | "
          f"{r['neighbor_tokens_s']:,.0f} |")


def source_rows(layout: RetrievalLayout, *, label: str, seq_len: int, batch: int,
                steps: int, tf_data: bool = False) -> list[dict]:
  """Retro and GPT batch sources (and optionally the tf.data path) over a layout."""
  names = tasks.register_retro_tasks(layout.root, "train", seq_len,
                                     name=f"bench_{label}_{seq_len}")
  rows = []
  retro = batches.TaskBatchSource(names.retro, batch_size=batch, seed=0)
  source = retro.stream.sources[0]
  k = source.num_neighbors
  gathered = source.chunks_per_example * k * source.retrieved_length
  rows.append(_row(f"{label} Retro get_batch", seq_len, batch, steps,
                   time_batches(retro.get_batch, steps), k=k, neighbor_tokens=gathered))
  gpt = batches.TaskBatchSource(names.gpt, batch_size=batch, seed=0)
  rows.append(_row(f"{label} GPT get_batch", seq_len, batch, steps,
                   time_batches(gpt.get_batch, steps)))
  if tf_data:
    iterator = retro.dataset(start_step=0).as_numpy_iterator()
    rows.append(_row(f"{label} Retro tf.data", seq_len, batch, steps,
                     time_batches(lambda _: next(iterator), steps), k=k,
                     neighbor_tokens=gathered))
  return rows


def sft_row(vocab_path: str, *, seq_len: int, batch: int, steps: int) -> dict:
  source = batches.sft_batch_source(vocab_path=vocab_path, seq_len=seq_len,
                                    batch_size=batch, seed=0, name="bench")
  return _row("SFT blend get_batch (tokenized on access, neighbors masked)", seq_len,
              batch, steps, time_batches(source.get_batch, steps))


def train_step_row(seq_len: int, batch: int, steps: int) -> dict:
  """The tiny model's Retro train step (``gin/models/tiny.gin``) on this machine."""
  with gin.unlock_config():
    gin.clear_config()
    gin_utils.parse_gin(["tiny.gin"])
    config = RetroConfig()
    gin.clear_config()
  result = train_bench.time_train_step(config, retrieval=True, batch=batch, seq_len=seq_len,
                           steps=steps, num_neighbors=config.num_neighbors)
  return dict(result, examples_s=batch / result["step_s"])


def instructretro_8b_need(*, mfu: float, peak_tflops: float, gpus_per_host: int,
                          seq_len: int = 4096, k: int = 2) -> dict:
  """Examples/s an 8B Retro train step consumes per GPU and per host."""
  gin.clear_config()
  gin_utils.parse_gin(["instructretro_8b.gin"])
  config = RetroConfig()
  gin.clear_config()
  flops = count_flops(config, seq_len, num_neighbors=k).train
  per_gpu = mfu * peak_tflops * 1e12 / flops
  return dict(train_flops=flops, per_gpu=per_gpu, per_host=per_gpu * gpus_per_host,
              seq_len=seq_len, k=k, mfu=mfu, peak=peak_tflops, gpus=gpus_per_host)


_RETRIEVAL_DIR = flags.DEFINE_string("retrieval_dir", None, "A prepared directory to read "
                                     "(its 'train' split); default: synthetic DBs.")
# (retro_jax.bench.train, imported for its step timer, owns --seq_len/--batch/--steps.)
_SEQ_LEN = flags.DEFINE_integer("seq_length", 512, "n of the tiny-shape rows and the "
                                "train step.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch of the tiny-shape rows and the "
                              "train step.")
_STEPS = flags.DEFINE_integer("batches", 20, "Timed batches per row.")
_BIG_BATCH = flags.DEFINE_integer("big_batch_size", 16, "Batch of the 8B-shape rows.")
_MFU = flags.DEFINE_float("mfu", 0.40, "Assumed MFU of the 8B train step.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Accelerator bf16 peak (H100: 989).")
_GPUS = flags.DEFINE_integer("gpus_per_host", 8, "Accelerators per host.")
_TRAIN_STEPS = flags.DEFINE_integer("train_timed_steps", 5, "Timed tiny train steps.")


def run(print_fn=print, *, workdir: Optional[str] = None) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    workdir = workdir or tmp
    rows = []
    print_fn(HEADER)
    if _RETRIEVAL_DIR.value:
      layouts = [("data", RetrievalLayout(_RETRIEVAL_DIR.value), _SEQ_LEN.value, _BATCH.value)]
    else:
      tiny = build_synthetic_layout(os.path.join(workdir, "tiny"), vocab_size=2048,
                                    query_chunks=40_000, db_chunks=100_000)
      big = build_synthetic_layout(os.path.join(workdir, "8b"), vocab_size=256_000,
                                   query_chunks=40_000, db_chunks=100_000)
      layouts = [("tiny shape", tiny, _SEQ_LEN.value, _BATCH.value),
                 ("8B shape", big, 4096, _BIG_BATCH.value)]
    for label, layout, seq_len, batch in layouts:
      for r in source_rows(layout, label=label, seq_len=seq_len, batch=batch,
                           steps=_STEPS.value, tf_data=label != "8B shape"):
        rows.append(r)
        print_fn(format_row(r))
    texts = [line for name in ("chat.jsonl", "prompt_response.jsonl", "qa.jsonl")
             for line in open(instructions.shipped_data_path("sft", name), encoding="utf-8")]
    spm = vocab_lib.train_sentencepiece(texts, os.path.join(workdir, "spm"), 1000,
                                        num_threads=1)
    r = sft_row(spm, seq_len=_SEQ_LEN.value, batch=_BATCH.value, steps=_STEPS.value)
    rows.append(r)
    print_fn(format_row(r))

  train = train_step_row(_SEQ_LEN.value, _BATCH.value, _TRAIN_STEPS.value)
  retro_tiny = rows[0]
  ratio = retro_tiny["examples_s"] / train["examples_s"]
  print_fn(f"\ntiny Retro train step (n={_SEQ_LEN.value}, batch {_BATCH.value}): "
           f"{train['step_s']:.3f} s/step = {train['examples_s']:,.1f} examples/s = "
           f"{train['tokens_s']:,.0f} tokens/s")
  print_fn(f"pipeline / train step consumption: {ratio:,.1f}x (target >= 10x)")

  need = instructretro_8b_need(mfu=_MFU.value, peak_tflops=_PEAK.value,
                               gpus_per_host=_GPUS.value)
  big_rows = [r for r in rows if r["pipeline"] == "8B shape Retro get_batch"]
  print_fn(f"\nInstructRetro 8B (gin/models/instructretro_8b.gin), n={need['seq_len']}, "
           f"k={need['k']}: {need['train_flops']:.3e} train FLOPs per example "
           f"(retro_jax.models.flops).")
  print_fn(f"At {100 * need['mfu']:.0f}% MFU of {need['peak']:.0f} TFLOP/s: "
           f"{need['mfu']:.2f} x {need['peak']:.0f}e12 / {need['train_flops']:.3e} = "
           f"{need['per_gpu']:.2f} examples/s per GPU ({need['per_gpu'] * need['seq_len']:,.0f}"
           f" tokens/s); x {need['gpus']} GPUs = {need['per_host']:.1f} examples/s per host "
           f"({need['per_host'] * need['seq_len']:,.0f} tokens/s, "
           f"{need['per_host'] * need['seq_len'] // 64 * need['k'] * 128:,.0f} neighbor "
           "tokens/s).")
  if big_rows:
    have = big_rows[0]["examples_s"]
    print_fn(f"This pipeline, one core, 8B shape: {have:,.1f} examples/s = "
             f"{have / need['per_host']:,.1f}x one host's need; the host needs "
             f"{need['per_host'] / have:.3f} of a core.")
  return dict(rows=rows, train=train, ratio=ratio, need=need)


def main(argv):
  del argv
  run()


if __name__ == "__main__":
  app.run(main)
