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
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import gin

from retro_jax.inference.generator import GenerationResult
from retro_jax.inference.loading import (DTYPE_FLAG_HELP, load_generator, read_passages,
                                         read_prompts)
from retro_jax.inference.sampling import SamplingConfig
from retro_jax.models import RetroConfig
from retro_jax.models.config import DTYPES
from retro_jax.utils import gin_utils
from retro_jax.utils.io import atomic_write_text


# Flags name the run (checkpoint, prompts, sampling overrides); gin may bind only what no
# flag sets, so a binding is never silently overridden.
@gin.configurable(allowlist=["model_config", "mesh_shape"])
def generate_texts(prompts: Sequence[str], *, checkpoint: str,
                   model_config: Optional[RetroConfig] = None,
                   vocab_path: Optional[str] = None, retrieval_dir: Optional[str] = None,
                   passages: Optional[Sequence[Sequence[str]]] = None,
                   retrieval: bool = True, max_new_tokens: int = 64,
                   sampling: Optional[SamplingConfig] = None, batch_size: int = 16,
                   mesh_shape: Optional[dict] = None,
                   dtype: Optional[str] = None) -> list[dict]:
  """Generates continuations of ``prompts`` in batches; returns one record per prompt.

  Args: as ``load_generator`` and ``Generator.generate``; ``passages`` holds per prompt
  its fixed passages (then live retrieval is not used).
  Returns:
    ``{"prompt", "text", "tokens", "finished", "retrievals"}`` per prompt.
  """
  generator = load_generator(checkpoint, model_config=model_config, vocab_path=vocab_path,
                             retrieval_dir=None if passages else retrieval_dir,
                             mesh_shape=mesh_shape, dtype=dtype)
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
  flags.DEFINE_enum("dtype", None, DTYPES, DTYPE_FLAG_HELP)


def main(argv) -> None:
  del argv
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
                           sampling=SamplingConfig(**overrides), batch_size=f.batch_size,
                           dtype=f.dtype)
  for record in records:
    print(format_record(record), flush=True)
  if f.output:
    atomic_write_text(f.output, "".join(json.dumps(r) + "\n" for r in records))
    logging.info("wrote %d records to %s", len(records), os.path.abspath(f.output))


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
