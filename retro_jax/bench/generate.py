r"""Generation speed: Retro with live retrieval vs its decoder alone (tokens/s).

    python -m retro_jax.bench.generate                          # CPU: tiny and 100m
    python -m retro_jax.bench.generate --sizes=100m,1b --batch_sizes=1,16,64   # a GPU

Setup (everything real, nothing mocked): the demo corpus (``retro_jax.data.encyclopedia``
at ``--db_scale``) is the retrieval DB, tokenised by a SentencePiece vocabulary trained
on it, chunked into m = 64-token chunks in a ``DocumentStore``, embedded by the MiniLM
sentence embedder (``--embedder``; a hashed bag-of-words embedder with
``--embedder=hash`` or when MiniLM is not installed) and searched by an exact Faiss
index, through the project's ``Retriever``. The model has random weights of the named
size (``retro_jax.bench.train.SIZES``), k = 2 neighbors of r = 128 tokens. Prompts are
``--prompt_tokens`` long (whole chunks: the prompt's chunks are retrieved before the
prefill) and every example generates exactly ``--new_tokens`` tokens (no EOS), so one
chunk is retrieved per 64 tokens per example.

Rows per (size, batch):

* ``decoder alone``: the same parameters with retrieval off (no encoder, no CCA);
* ``Retro, fixed neighbors``: encoder and CCA on fixed passages (the model's own
  overhead, without retrieval);
* ``Retro, live retrieval``: embed + search + fetch at every completed chunk, encoder
  once per chunk, CCA at every token.

tokens/s counts new tokens of a whole ``generate`` call (prompt retrieval and prefill
included), for the best of ``--repeats`` timed calls (modes interleaved, after a
warm-up call of each that compiles; the median is printed too);
``retrieval`` is the share of the call spent in the retriever (embedding, search, DB
fetch); ``vs decoder`` is the ratio to the decoder-alone row of the same batch.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from retro_jax.bench.train import SIZES
from retro_jax.data import encyclopedia
from retro_jax.data import vocab as vocab_lib
from retro_jax.inference.generator import Generator, LiveNeighbors, passages_to_neighbors
from retro_jax.models import RetroConfig, init_params, param_count
from retro_jax.retrieval.embedders import load_embedder
from retro_jax.retrieval.retriever import DocumentStore, Retriever

MODES = ("decoder alone", "Retro, fixed neighbors", "Retro, live retrieval")


class HashEmbedder:
  """Normalised hashed bag of words (a fallback when MiniLM is not installed)."""

  dim = 256

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      for word in text.lower().split():
        out[i, sum(map(ord, word)) % self.dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def load_bench_embedder(name: str) -> tuple[Any, str]:
  if name != "hash":
    try:
      return load_embedder(name), name
    except (ImportError, FileNotFoundError) as e:
      logging.warning("embedder %s unavailable (%s); using a hashed bag of words", name, e)
  return HashEmbedder(), "hash"


def build_retrieval(workdir: str, db_scale: float, embedder: Any, chunk_length: int,
                    num_neighbors: int) -> tuple[Any, Retriever, list[str]]:
  """(vocab, retriever over the demo corpus, texts for prompts)."""
  result = encyclopedia.generate_corpus(workdir, scale=db_scale)
  paths = result["paths"]

  def texts(key):
    with open(paths[key], encoding="utf-8") as f:
      return [json.loads(line)["text"] for line in f]

  documents = texts("retrieval")
  spm_path = vocab_lib.train_sentencepiece(documents, f"{workdir}/spm", vocab_size=4096,
                                           num_threads=1)
  vocab = vocab_lib.load_sentencepiece(spm_path)
  store = DocumentStore(vocab, embedder, chunk_length=chunk_length)
  store.add_documents(documents)
  retriever = Retriever(embedder, vocab, store, num_neighbors=num_neighbors)
  logging.info("retrieval DB: %d documents, %d chunks", store.num_docs, store.num_chunks)
  return vocab, retriever, texts("heldout")


def bench_size(size: str, batch_sizes: Sequence[int], *, vocab: Any, retriever: Retriever,
               prompt_texts: Sequence[str], prompt_tokens: int, new_tokens: int,
               repeats: int, dtype: str, param_dtype: str,
               print_fn: Callable[[str], None]) -> list[dict]:
  config = RetroConfig(**SIZES[size], chunk_length=64, num_neighbors=2,
                       encoder_dropout_rate=0.0, dtype=dtype, param_dtype=param_dtype,
                       max_length=max(2048, prompt_tokens + new_tokens))
  params = jax.jit(lambda key: init_params(config, key))(jax.random.PRNGKey(0))
  generator = Generator(config, params, vocab, eos_id=None)
  ids = [vocab.encode(t) for t in prompt_texts]
  ids = [p[:prompt_tokens] for p in ids if len(p) >= prompt_tokens]
  if not ids:
    raise ValueError(f"no held-out document has {prompt_tokens} tokens for a prompt")
  rows = []
  for batch in batch_sizes:
    prompts = [ids[i % len(ids)] for i in range(batch)]
    passages = passages_to_neighbors(vocab, [[prompt_texts[0][:400]] * 2] * batch,
                                     config.neighbor_length)
    runs = {
        MODES[0]: lambda: generator.generate_tokens(prompts, max_new_tokens=new_tokens),
        MODES[1]: lambda: generator.generate_tokens(prompts, max_new_tokens=new_tokens,
                                                    neighbors=passages),
        MODES[2]: lambda: generator.generate_tokens(prompts, max_new_tokens=new_tokens,
                                                    neighbors=LiveNeighbors(retriever)),
    }
    # Warm up (compile) every mode, then time them interleaved: on a shared machine
    # the best of the repeats is the least disturbed measurement.
    results = {mode: fn() for mode, fn in runs.items()}
    seconds = {mode: [] for mode in runs}
    for _ in range(repeats):
      for mode, fn in runs.items():
        results[mode] = fn()
        seconds[mode].append(results[mode].stats["seconds"])
    base = None
    for mode in runs:
      best, stats = min(seconds[mode]), results[mode].stats
      tokens_per_s = batch * new_tokens / best
      base = tokens_per_s if base is None else base
      row = {"size": size, "params": param_count(params), "batch": batch, "mode": mode,
             "tokens_per_s": tokens_per_s, "seconds": best,
             "median_seconds": statistics.median(seconds[mode]),
             "retrieval_share": stats["retrieval_s"] / max(stats["seconds"], 1e-9),
             "chunks": stats["retrieved_chunks"], "vs_decoder": tokens_per_s / base}
      rows.append(row)
      print_fn(f"| {size} | {row['params'] / 1e6:.1f}M | {batch} | {mode} | "
               f"{tokens_per_s:.1f} | {best:.2f} ({row['median_seconds']:.2f}) | "
               f"{100 * row['retrieval_share']:.1f}% | {row['chunks']} | "
               f"{row['vs_decoder']:.2f} |")
  return rows


def run(sizes: Sequence[str], batch_sizes: Sequence[int], *, embedder: str = "all-MiniLM-L6-v2",
        db_scale: float = 0.1, prompt_tokens: int = 64, new_tokens: int = 192,
        repeats: int = 3, dtype: str = "float32", param_dtype: str = "float32",
        print_fn: Callable[[str], None] = print, workdir: Optional[str] = None) -> list[dict]:
  """Runs the benchmark and prints a markdown table; returns its rows."""
  for size in sizes:
    if size not in SIZES:
      raise ValueError(f"--sizes: unknown size {size!r}; known: {sorted(SIZES)}")
  emb, emb_name = load_bench_embedder(embedder)
  with tempfile.TemporaryDirectory() as tmp:
    vocab, retriever, prompt_texts = build_retrieval(workdir or tmp, db_scale, emb, 64, 2)
    print_fn(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; embedder: "
             f"{emb_name}; DB: {retriever.store.num_docs} documents, "
             f"{retriever.store.num_chunks} chunks (exact Faiss); prompt {prompt_tokens} + "
             f"{new_tokens} new tokens, m = 64, k = 2; compute {dtype}, params {param_dtype}")
    print_fn("| size | params | batch | mode | tokens/s | s/call best (median) | "
             "retrieval | chunks retrieved | vs decoder |")
    print_fn("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size in sizes:
      rows += bench_size(size, batch_sizes, vocab=vocab, retriever=retriever,
                         prompt_texts=prompt_texts, prompt_tokens=prompt_tokens,
                         new_tokens=new_tokens, repeats=repeats, dtype=dtype,
                         param_dtype=param_dtype,
                         print_fn=print_fn)
  return rows


def _define_flags() -> None:
  # --sizes and --dtype are retro_jax.bench.train's flags (imported above).
  flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
  flags.DEFINE_string("embedder", "all-MiniLM-L6-v2", "Sentence embedder name/dir, or "
                      "'hash'.")
  flags.DEFINE_float("db_scale", 0.1, "Demo corpus scale of the retrieval DB.")
  flags.DEFINE_integer("prompt_tokens", 64, "Prompt length (tokens).")
  flags.DEFINE_integer("new_tokens", 192, "New tokens per example.")
  flags.DEFINE_integer("repeats", 3, "Timed calls per row (best and median).")
  flags.DEFINE_string("param_dtype", "float32", "Parameter dtype: float32 or bfloat16 "
                      "(with --dtype=bfloat16: weights held in bf16, as Megatron's --bf16 "
                      "inference and eval_qa.param_dtype).")


def main(argv):
  del argv
  f = flags.FLAGS
  run(f.sizes, [int(b) for b in f.batch_sizes], embedder=f.embedder, db_scale=f.db_scale,
      prompt_tokens=f.prompt_tokens, new_tokens=f.new_tokens, repeats=f.repeats,
      dtype=f.dtype, param_dtype=f.param_dtype)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
