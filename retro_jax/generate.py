r"""Generation entry point: a checkpoint, a vocabulary, prompts -> continuations.

    python -m retro_jax.generate --gin_file=tiny.gin --checkpoint=/tmp/retrofit \
        --retrieval_dir=/data/retro --prompt="The capital of Zorbia is"

    python -m retro_jax.generate --gin_file=tiny.gin --checkpoint=/tmp/sft \
        --vocab=/data/retro/vocab/spm.model --prompts_file=prompts.jsonl \
        --passages_file=passages.txt --max_new_tokens=64 --temperature=0.7 --top_p=0.9 \
        --output=/tmp/generations.jsonl

The model architecture comes from gin (as in ``retro_jax.train``); the flags name the
run. Neighbors, in order of precedence:

* ``--no_retrieval``: the decoder alone (the "encoder ablated" mode);
* passages: ``--passages_file`` (a .txt file, one passage per line, or .jsonl with
  ``{"title", "text"}`` rows), or a ``"passages"`` list in a .jsonl prompts file row;
  each is tokenised into an r-token neighbor read by every chunk;
* ``--retrieval_dir``: live retrieval from a directory ``python -m retro_jax.preprocess``
  prepared (embedder + Faiss index + chunk DB; its vocabulary is the default
  ``--vocab``).

Prompts: ``--prompt`` (repeatable) or ``--prompts_file`` (.txt: one per line; .jsonl:
``{"prompt": ..., "passages": [...]}``). Output: each continuation with the DB chunks
each chunk retrieved, printed and (``--output``) written as jsonl.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from absl import flags
from absl import logging
import gin
import jax

from retro_jax.data import vocab as vocab_lib
from retro_jax.inference.generator import Generator, GenerationResult
from retro_jax.inference.sampling import SamplingConfig
from retro_jax.models import RetroConfig
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.models import partitioning
from retro_jax.utils import gin_utils
from retro_jax.utils.io import atomic_write_text


def read_prompts(path: str) -> tuple[list[str], Optional[list[list[str]]]]:
  """Prompts (and per-prompt passages, if any row has them) from a .txt or .jsonl file."""
  from retro_jax.data.chat import format_passage  # pylint: disable=g-import-not-at-top
  prompts, passages, any_passages = [], [], False
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      if not path.endswith(".jsonl"):
        prompts.append(line.rstrip("\n"))
        passages.append([])
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e})") from e
      if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise ValueError(f"{path}:{number}: expected {{\"prompt\": str, \"passages\": "
                         f"[...] (optional)}}")
      prompts.append(row["prompt"])
      passages.append([format_passage(p) for p in row.get("passages", [])])
      any_passages |= bool(row.get("passages"))
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts, (passages if any_passages else None)


def read_passages(path: str) -> list[str]:
  """Passages from a .txt file (one per line) or .jsonl (``{"title", "text"}`` rows)."""
  from retro_jax.data.chat import format_passage  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if path.endswith(".jsonl"):
    return [format_passage(json.loads(line)) for line in lines]
  return lines


def load_generator(checkpoint: str, *, model_config: Optional[RetroConfig] = None,
                   vocab_path: Optional[str] = None, retrieval_dir: Optional[str] = None,
                   mesh_shape: Optional[dict] = None, retriever: Any = None) -> Generator:
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
  """
  from retro_jax.retrieval import retriever as retriever_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.layout import RetrievalLayout  # pylint: disable=g-import-not-at-top
  config = model_config or ckpt_lib.stored_model_config(checkpoint) or RetroConfig()
  if vocab_path is None:
    vocab_path = ckpt_lib.model_dir_vocab(checkpoint)
  if vocab_path is None:
    if retrieval_dir is None:
      raise ValueError("--vocab is required without --retrieval_dir (or a model "
                       "directory with vocab/spm.model)")
    vocab_path = RetrievalLayout(retrieval_dir).vocab_path
  vocab = vocab_lib.load_sentencepiece(vocab_path)
  if mesh_shape is None:
    mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
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


@gin.configurable
def generate_texts(prompts: Sequence[str], *, checkpoint: str = gin.REQUIRED,
                   model_config: Optional[RetroConfig] = None,
                   vocab_path: Optional[str] = None, retrieval_dir: Optional[str] = None,
                   passages: Optional[Sequence[Sequence[str]]] = None,
                   retrieval: bool = True, max_new_tokens: int = 64,
                   sampling: Optional[SamplingConfig] = None, batch_size: int = 16,
                   mesh_shape: Optional[dict] = None) -> list[dict]:
  """Generates continuations of ``prompts`` in batches; returns one record per prompt.

  Args: as ``load_generator`` and ``Generator.generate``; ``passages`` holds per prompt
  its fixed passages (then live retrieval is not used).
  Returns:
    ``{"prompt", "text", "tokens", "finished", "retrievals"}`` per prompt.
  """
  generator = load_generator(checkpoint, model_config=model_config, vocab_path=vocab_path,
                             retrieval_dir=None if passages else retrieval_dir,
                             mesh_shape=mesh_shape)
  retrieval = retrieval and generator.has_retro
  records = []
  for start in range(0, len(prompts), batch_size):
    batch = list(prompts[start:start + batch_size])
    result: GenerationResult = generator.generate(
        batch, max_new_tokens=max_new_tokens, sampling=sampling,
        passages=None if passages is None else passages[start:start + batch_size],
        retrieval=retrieval)
    for prompt, record in zip(batch, result.to_json()):
      records.append(dict(prompt=prompt, **record))
    logging.info("generated %d/%d prompts (%.1f tokens/s)", len(records), len(prompts),
                 sum(len(t) for t in result.tokens) / max(result.stats["seconds"], 1e-9))
  return records


def format_record(record: dict) -> str:
  """Human-readable: the prompt, the continuation, and what each chunk retrieved."""
  lines = [f"PROMPT: {record['prompt']}", f"OUTPUT: {record['text']}"]
  for chunk in record["retrievals"]:
    where = "prompt" if chunk["in_prompt"] else "generated"
    lines.append(f"  chunk {chunk['chunk_index']} ({where}) {chunk['query']!r}")
    for hit in chunk["neighbors"]:
      score = "" if hit.get("score") is None else f" score={hit['score']:.3f}"
      source = (f"passage {hit['doc_id']}" if hit.get("chunk_id", -1) < 0
                else f"doc {hit['doc_id']} chunk {hit['chunk_id']}")
      lines.append(f"    <- {source}{score}: {hit['text'][:120]!r}")
  return "\n".join(lines)


# Command line ------------------------------------------------------------------------


def _define_flags() -> None:
  gin_utils.define_gin_flags()
  flags.DEFINE_string("checkpoint", None, "MODEL_DIR or a step directory.")
  flags.DEFINE_string("vocab", None, "SentencePiece model (default: the retrieval "
                      "directory's).")
  flags.DEFINE_string("retrieval_dir", None, "Prepared retrieval directory (live "
                      "retrieval).")
  flags.DEFINE_string("passages_file", None, "Fixed passages for every prompt (.txt or "
                      ".jsonl).")
  flags.DEFINE_bool("no_retrieval", False, "Decoder alone.")
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
  flags.DEFINE_string("prompts_file", None, "Prompts (.txt or .jsonl).")
  flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt.")
  flags.DEFINE_float("temperature", None, "0 = greedy (default: gin's SamplingConfig).")
  flags.DEFINE_integer("top_k", None, "Top-k filter (0 = off).")
  flags.DEFINE_float("top_p", None, "Top-p filter (1 = off).")
  flags.DEFINE_integer("seed", None, "Sampling seed.")
  flags.DEFINE_integer("batch_size", 16, "Prompts per batch.")
  flags.DEFINE_string("output", None, "Write the records to this .jsonl file.")


def main(argv) -> None:
  del argv
  from absl import app  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  gin_utils.parse_gin(f.gin_file, f.gin_bindings)
  if not f.checkpoint:
    raise app.UsageError("--checkpoint is required")
  prompts = list(f.prompt)
  passages = None
  if f.prompts_file:
    file_prompts, passages = read_prompts(f.prompts_file)
    if prompts and passages is not None:
      passages = [[] for _ in prompts] + passages
    prompts += file_prompts
  if not prompts:
    raise app.UsageError("give --prompt or --prompts_file")
  if f.passages_file:
    shared = read_passages(f.passages_file)
    passages = [shared + (passages[i] if passages else []) for i in range(len(prompts))]
  overrides = {name: f[name].value for name in ("temperature", "top_k", "top_p", "seed")
               if f[name].value is not None}
  records = generate_texts(prompts, checkpoint=f.checkpoint, vocab_path=f.vocab,
                           retrieval_dir=f.retrieval_dir, passages=passages,
                           retrieval=not f.no_retrieval, max_new_tokens=f.max_new_tokens,
                           sampling=SamplingConfig(**overrides), batch_size=f.batch_size)
  for record in records:
    print(format_record(record), flush=True)
  if f.output:
    atomic_write_text(f.output, "".join(json.dumps(r) + "\n" for r in records))
    logging.info("wrote %d records to %s", len(records), os.path.abspath(f.output))


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
