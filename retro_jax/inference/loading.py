"""What a generation front end loads: a ``Generator`` for a checkpoint, and the prompts
and passages files of ``python -m retro_jax.generate``.

* ``load_generator(checkpoint, ...)``: the architecture (given, stored in the
  checkpoint, or gin's ``RetroConfig()``), the vocabulary (given, the model
  directory's ``vocab/spm.model``, or the retrieval directory's), the parameters on a
  mesh, and a retriever (given, or loaded from a retrieval directory; dropped for a
  decoder-only checkpoint).
* ``read_prompts(path)``: a .txt file (one prompt per line) or .jsonl
  (``{"prompt": str, "passages": [...] (optional)}`` per line).
* ``read_passages(path)``: a .txt file (one passage per line) or .jsonl
  (``{"title", "text"}`` per line), each formatted as ``data.chat.format_passage``.
"""

from __future__ import annotations

import dataclasses

from typing import Any, Optional

from absl import logging
import jax

from retro_jax.data import vocab as vocab_lib
from retro_jax.data.chat import format_passage
from retro_jax.inference.generator import Generator
from retro_jax.models import RetroConfig
from retro_jax.models import partitioning
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.utils.io import read_jsonl


def read_prompts(path: str) -> tuple[list[str], Optional[list[list[str]]]]:
  """Prompts (and per-prompt passages, if any row has them) from a .txt or .jsonl file."""
  prompts, passages, any_passages = [], [], False
  if path.endswith(".jsonl"):
    for where, row in read_jsonl(path):
      if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: expected {{\"prompt\": str, \"passages\": "
                         f"[...] (optional)}}")
      prompts.append(row["prompt"])
      passages.append([format_passage(p) for p in row.get("passages", [])])
      any_passages |= bool(row.get("passages"))
  else:
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          prompts.append(line.rstrip("\n"))
          passages.append([])
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts, (passages if any_passages else None)


def read_passages(path: str) -> list[str]:
  """Passages from a .txt file (one per line) or .jsonl (``{"title", "text"}`` rows)."""
  if path.endswith(".jsonl"):
    return [format_passage(row) for _, row in read_jsonl(path)]
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


# The --dtype flag of the entry points that decode (generate, serve): load_generator's.
DTYPE_FLAG_HELP = ("Compute dtype (default: the checkpoint's), e.g. float32 for a bf16 "
                   "checkpoint on a CPU without bf16 units.")


def load_generator(checkpoint: str, *, model_config: Optional[RetroConfig] = None,
                   vocab_path: Optional[str] = None, retrieval_dir: Optional[str] = None,
                   mesh_shape: Optional[dict] = None, retriever: Any = None,
                   dtype: Optional[str] = None) -> Generator:
  """A ``Generator`` for a checkpoint (GPT or Retro), its vocabulary and a retriever.

  Args:
    checkpoint: MODEL_DIR or one step's directory.
    model_config: the architecture (default: the one stored in the checkpoint, else
      ``RetroConfig()`` as bound by gin).
    vocab_path: SentencePiece model (default: ``MODEL_DIR/vocab/spm.model`` when the
      model directory has one, else the retrieval directory's).
    retrieval_dir: a prepared retrieval directory for live retrieval, or None.
    mesh_shape: devices to hold the parameters (default: one device).
    retriever: an already built retriever (instead of ``retrieval_dir``).
    dtype: compute dtype (``RetroConfig.dtype``; default the architecture's),
      e.g. 'float32' for a bf16 checkpoint on a CPU without bf16 units. Parameters
      narrower than it are loaded in it (else every step would convert them); the
      generator holds wider weight matrices in it.
  """
  config = model_config or ckpt_lib.stored_model_config(checkpoint) or RetroConfig()
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
    if config.params_dtype.itemsize < config.compute_dtype.itemsize:
      config = dataclasses.replace(config, param_dtype=dtype)
  if vocab_path is None:
    vocab_path = ckpt_lib.model_dir_vocab(checkpoint)
  if vocab_path is None:
    if retrieval_dir is None:
      raise ValueError("--vocab is required without --retrieval_dir (or a model "
                       "directory with vocab/spm.model)")
    vocab_path = RetrievalLayout(retrieval_dir).vocab_path
  vocab = vocab_lib.load_sentencepiece(vocab_path)
  if mesh_shape is None:
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  else:
    mesh = partitioning.make_mesh(mesh_shape)
  params, _, has_retro = ckpt_lib.load_model_params(checkpoint, config, mesh)
  if retriever is None and retrieval_dir is not None:
    retriever = retriever_lib.load_retriever(retrieval_dir)
  if not has_retro and retriever is not None:
    logging.warning("%s holds a decoder without encoder/CCA: generating without "
                    "retrieval", checkpoint)
    retriever = None
  return Generator(config, params, vocab, retriever=retriever)
