r"""Every offline retrieval stage in one command, with defaults, for a user with documents.

    python -m retro_jax.preprocess --input=docs.jsonl --output_dir=/data/retro
    python -m retro_jax.preprocess --input=wiki/*.jsonl --train_input=pile.jsonl \
        --split=valid=heldout.jsonl --text_key=content --output_dir=/data/retro \
        --shard_id=$SLURM_ARRAY_TASK_ID --num_shards=$SLURM_ARRAY_TASK_COUNT
    python -m retro_jax.preprocess --input=docs.jsonl --output_dir=/data/retro \
        --gin_file=preprocess/default.gin --gin.preprocess.num_neighbors=4

Runs ``retro_jax.retrieval.pipeline.preprocess`` (the gin configurable ``preprocess``;
its module docstring describes the directory it writes, same-document exclusion and
sharding). Flags that are set override gin bindings; unset ones leave gin and the
defaults.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from absl import flags
import gin

from retro_jax.data import corpus as corpus_lib
from retro_jax.retrieval import pipeline
from retro_jax.retrieval import search as search_lib
from retro_jax.utils import gin_utils


def _define_flags():
  flags.DEFINE_multi_string("input", None, "The retrieval corpus: jsonl/text files, "
                            "directories, globs or tfds:<name> (repeatable).")
  flags.DEFINE_string("output_dir", None, "The retrieval directory to write.")
  flags.DEFINE_string("vocab", None, "A SentencePiece .model to use (default: train one "
                      "on the retrieval corpus).")
  flags.DEFINE_integer("vocab_size", None, f"Pieces of a trained vocabulary (default "
                       f"{pipeline.DEFAULT_VOCAB_SIZE}; fewer on a small corpus).")
  flags.DEFINE_multi_string("train_input", None, "The training corpus (default: the "
                            "retrieval corpus; then same-document exclusion is on).")
  flags.DEFINE_multi_string("split", [], "An extra query split NAME=FILES (comma-"
                            "separated), e.g. --split=valid=heldout.jsonl; repeatable.")
  flags.DEFINE_multi_string("lm_split", [], "A split NAME=FILES that gets a query DB "
                            "but no neighbor map (text for a decoder alone, e.g. GPT "
                            "pretraining text); repeatable.")
  flags.DEFINE_enum("input_format", None, list(corpus_lib.FORMATS), "Corpus format "
                    "(default auto: jsonl by suffix, else text).")
  flags.DEFINE_string("text_key", None, "jsonl key / TFDS feature of the text (default "
                      "'text'; NeMo's --json-keys).")
  flags.DEFINE_enum("text_unit", None, list(corpus_lib.TEXT_UNITS), "Text files: a "
                    "document per file (default) or per line.")
  flags.DEFINE_string("tfds_split", None, "TFDS split (default train).")
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory.")
  flags.DEFINE_integer("chunk_size", None, "m, tokens per chunk (default 64).")
  flags.DEFINE_integer("num_neighbors", None, "k neighbors per chunk (default 2).")
  flags.DEFINE_integer("extra_neighbors", None, "Extra candidates queried for same-"
                       "document exclusion (default 8).")
  flags.DEFINE_string("embedder", None, f"Embedder: a known name or a sentence-"
                      f"transformers directory (default {pipeline.DEFAULT_EMBEDDER}).")
  flags.DEFINE_enum("embedding_dtype", None, ["float16", "float32"], "Embedding files "
                    "(default float16).")
  flags.DEFINE_string("factory", None, "Faiss factory string (default: by DB size; see "
                      "retro_jax.retrieval.index).")
  flags.DEFINE_enum("metric", None, sorted(search_lib.METRICS), "ip (cosine of unit-norm "
                    "embeddings; default) or l2.")
  flags.DEFINE_integer("nprobe", None, "IVF lists searched (default: by index size).")
  flags.DEFINE_integer("ef_search", None, "HNSW efSearch (HNSW indexes / quantizers).")
  flags.DEFINE_integer("train_size", None, "Index training sample (default 40 per IVF "
                       "centroid).")
  flags.DEFINE_integer("seed", None, "Vocabulary and index seed (default 0).")
  flags.DEFINE_enum("exclude_same_document", None, ["auto", "true", "false"], "Drop "
                    "neighbors from the query chunk's own document (default auto: when "
                    "the split's documents are the retrieval DB's first documents).")
  flags.DEFINE_integer("shard_id", None, "This shard of every stage (default 0).")
  flags.DEFINE_integer("num_shards", None, "Shards (default 1), e.g. a Slurm array.")
  flags.DEFINE_bool("wait", None, "Wait for other shards between stages (default true).")
  flags.DEFINE_float("wait_timeout", None, "Give up waiting after this many seconds.")
  flags.DEFINE_enum("use_gpu", None, ["auto", "true", "false"], "Faiss on GPUs "
                    "(default auto).")
  flags.DEFINE_bool("progress", None, "Progress bars (default true).")
  flags.DEFINE_multi_string("gin_file", [], "gin files (searched in gin/ too), binding "
                            "preprocess.* and the stages' functions.")
  flags.DEFINE_multi_string("gin_bindings", [], "gin bindings KEY=VALUE (or "
                            "--gin.KEY=VALUE).")


_PLAIN_FLAGS = ("vocab", "vocab_size", "input_format", "text_key", "text_unit",
                "tfds_split", "tfds_data_dir", "chunk_size", "num_neighbors",
                "extra_neighbors", "embedder", "embedding_dtype", "factory", "metric",
                "nprobe", "ef_search", "train_size", "seed", "shard_id", "num_shards",
                "wait", "wait_timeout", "progress")
_TRI_STATE = {"auto": "auto", "true": True, "false": False}


def main(argv: Sequence[str]) -> None:
  """Flags that are set override gin bindings; unset ones leave gin / the defaults."""
  del argv
  f = flags.FLAGS
  gin_utils.parse_gin(f.gin_file, f.gin_bindings)
  kwargs: dict[str, Any] = {k: f[k].value for k in _PLAIN_FLAGS if f[k].value is not None}
  if f.input:
    kwargs["input"] = pipeline.squeeze_inputs(f.input)
  if f.output_dir:
    kwargs["output_dir"] = f.output_dir
  if f.train_input:
    kwargs["train_input"] = pipeline.squeeze_inputs(f.train_input)
  if f.split:
    kwargs["splits"] = pipeline.parse_splits(f.split)
  if f.lm_split:
    kwargs["lm_splits"] = pipeline.parse_splits(f.lm_split, "lm_split")
  for name in ("exclude_same_document", "use_gpu"):
    if f[name].value is not None:
      kwargs[name] = _TRI_STATE[f[name].value]
  bound = gin.get_bindings(pipeline.preprocess) if hasattr(gin, "get_bindings") else {}
  for required in ("input", "output_dir"):
    if required not in kwargs and required not in bound:
      raise flags.ValidationError(f"--{required} is required (or bind preprocess."
                                  f"{required} in gin)")
  summary = pipeline.preprocess(**kwargs)
  if not summary.get("complete"):
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
