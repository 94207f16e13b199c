r"""Chunk-embedding throughput: our Flax encoder vs sentence-transformers (PyTorch).

    python -m retro_jax.bench.embedding                        # 512 chunks of prose
    python -m retro_jax.bench.embedding --num_texts=8192 --dtype=bfloat16   # accelerator

Both embed the same texts on the same machine, end to end (tokenisation, padding,
encoder, pooling, normalisation; output on the host): ``FlaxSentenceEmbedder.embed_texts``
and ``SentenceTransformer.encode`` (its default batch of 32, sorted by length). Texts
default to chunk-sized pieces (~256 characters, about 64 SentencePiece / 70
WordPiece tokens, the length of a RETRO chunk) of real English prose: the Python
documentation topics shipped with the standard library
(``retro_jax.data.prose.prose_chunks``).
Each side gets an untimed warm-up (the Flax side over all texts, so that every
padded shape is compiled; sentence-transformers over 64 texts), then the best of
``repeats`` timed passes. PyTorch gets as many threads as JAX's CPU backend
uses (the cores this process may run on). The rows also report the smallest cosine
between the two sides' vectors (a sanity check; parity is tested in
tests/test_embedders.py).

``run_embedding_bench(...)`` returns the rows (dicts) for ``retro_jax.bench.retrieval``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from retro_jax.data.prose import prose_chunks
from retro_jax.retrieval.embedders import load_embedder

HEADER = ("| embedder | device | dtype | texts | mean tokens | seconds | chunks/s | "
          "vs sentence-transformers | min cosine |\n|---|---|---|---|---|---|---|---|---|")


def cpu_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _best_time(fn: Callable[[], np.ndarray], repeats: int,
               warm_up: Callable[[], object]) -> tuple[float, np.ndarray]:
  warm_up()
  best, out = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def run_embedding_bench(texts: Optional[Sequence[str]] = None, *, num_texts: int = 512,
                        chunk_chars: int = 256, embedder: str = "all-MiniLM-L6-v2",
                        dtype: str = "float32", repeats: int = 2,
                        sentence_transformers: bool = True, st_batch_size: int = 32,
                        threads: Optional[int] = None,
                        embedder_options: Optional[dict[str, Any]] = None,
                        print_fn=print) -> list[dict]:
  """Times the Flax embedder (and sentence-transformers) on the same texts.

  Args:
    texts: Texts to embed; default ``prose_chunks(num_texts, chunk_chars)``.
    embedder: A known name or a local sentence-transformers directory.
    dtype: The Flax embedder's dtype ('float32' or 'bfloat16'); sentence-transformers
      runs float32.
    repeats: Timed passes after the warm-up (the best is reported).
    sentence_transformers: Also time ``SentenceTransformer.encode`` (needs torch).
    st_batch_size: sentence-transformers' batch size (its default is 32).
    threads: PyTorch threads (default: the cores JAX's CPU backend uses).
    embedder_options: Extra ``FlaxSentenceEmbedder`` options (tokens_per_batch...).
  Returns:
    One dict per embedder: name, device, dtype, texts, mean_tokens, seconds,
    chunks_per_s, ratio (chunks/s over sentence-transformers', None without it),
    min_cosine (against sentence-transformers, None without it).
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be at least 1")
  texts = list(texts) if texts is not None else prose_chunks(num_texts, chunk_chars)
  flax_embedder = load_embedder(embedder, dtype=dtype, **(embedder_options or {}))
  mean_tokens = float(np.mean([len(x) for x in flax_embedder.tokenize(texts)]))
  device = jax.devices()[0]
  device_name = f"{device.device_kind} x{len(flax_embedder.devices)}"
  embed = lambda: flax_embedder.embed_texts(texts)
  load_before = os.getloadavg()[0]
  seconds, flax_vectors = _best_time(embed, repeats, warm_up=embed)
  rows = [dict(name="retro_jax Flax", device=device_name, dtype=dtype, texts=len(texts),
               mean_tokens=mean_tokens, seconds=seconds, chunks_per_s=len(texts) / seconds,
               ratio=None, min_cosine=None)]
  if sentence_transformers:
    import torch  # pylint: disable=g-import-not-at-top
    from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads or cpu_threads())
    model = SentenceTransformer(flax_embedder.spec.model_dir, device="cpu")
    model.max_seq_length = flax_embedder.spec.max_seq_length
    encode = lambda batch: model.encode(batch, batch_size=st_batch_size,
                                        convert_to_numpy=True, show_progress_bar=False)
    st_seconds, st_vectors = _best_time(lambda: encode(texts), repeats,
                                        warm_up=lambda: encode(texts[:64]))
    st_vectors = np.asarray(st_vectors, np.float32)
    cosine = np.sum(flax_vectors * st_vectors, axis=1) / np.maximum(
        np.linalg.norm(flax_vectors, axis=1) * np.linalg.norm(st_vectors, axis=1), 1e-12)
    st_row = dict(name=f"sentence-transformers (torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads, batch {st_batch_size})",
                  device="cpu", dtype="float32", texts=len(texts), mean_tokens=mean_tokens,
                  seconds=st_seconds, chunks_per_s=len(texts) / st_seconds, ratio=1.0,
                  min_cosine=1.0)
    rows[0].update(ratio=rows[0]["chunks_per_s"] / st_row["chunks_per_s"],
                   min_cosine=float(cosine.min()))
    rows.append(st_row)
  print_fn(f"embedding bench: {len(texts)} texts, {mean_tokens:.1f} WordPiece tokens on "
           f"average, {cpu_threads()} CPU threads, best of {repeats} after a warm-up; "
           f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; "
           f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print_fn(HEADER)
  for r in rows:
    print_fn(format_row(r))
  return rows


def format_row(r: dict) -> str:
  ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
  cosine = "n/a" if r["min_cosine"] is None else f"{r['min_cosine']:.6f}"
  return (f"| {r['name']} | {r['device']} | {r['dtype']} | {r['texts']} | "
          f"{r['mean_tokens']:.1f} | {r['seconds']:.3f} | {r['chunks_per_s']:.1f} | "
          f"{ratio} | {cosine} |")


def main(argv):
  del argv
  f = flags.FLAGS
  options = {}
  if f.tokens_per_batch:
    options["tokens_per_batch"] = f.tokens_per_batch
  run_embedding_bench(num_texts=f.num_texts, chunk_chars=f.chunk_chars,
                      embedder=f.embedder, dtype=f.dtype, repeats=f.repeats,
                      sentence_transformers=f.sentence_transformers,
                      st_batch_size=f.st_batch_size, embedder_options=options)


if __name__ == "__main__":
  flags.DEFINE_integer("num_texts", 512, "Chunk texts to embed.")
  flags.DEFINE_integer("chunk_chars", 256, "Characters per text (cut at word boundaries).")
  flags.DEFINE_string("embedder", "all-MiniLM-L6-v2", "Known name or local directory.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Flax compute dtype.")
  flags.DEFINE_integer("repeats", 2, "Timed passes after a warm-up (best reported).")
  flags.DEFINE_bool("sentence_transformers", True, "Also time sentence-transformers.")
  flags.DEFINE_integer("st_batch_size", 32, "sentence-transformers batch size.")
  flags.DEFINE_integer("tokens_per_batch", 0, "Flax padded tokens per batch (0: default).")
  app.run(main)
