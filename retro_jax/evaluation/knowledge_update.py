"""The knowledge update of the InstructRetro recipe: facts changed in the retrieval DB,
no retraining, and how often the models follow the new facts.

* as language modelling: ``fact_completion_prompts`` cuts each entity's held-out
  document just before the old value of a changed fact; ``fact_completion_scores``
  lets a Retro LM (greedy, retrieving from a DB) complete it and counts completions
  that state the new value (and those that keep the old one);
* as QA: ``knowledge_update_scores`` counts the ``run_qa`` predictions that match the
  new answers (and the old ones);
* the updated DB: ``build_updated_retrieval`` prepares a retrieval directory for the
  updated corpus with the original's vocabulary, embedder and settings, embedding only
  the chunk texts that changed.

Update rows: the corpus's ``updates.jsonl`` (``retro_jax.data.encyclopedia``), one
``{"entity", "old", "new", "question", "old_answers", "new_answers", ...}`` per changed
fact.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from retro_jax.evaluation.qa import exact_match
from retro_jax.retrieval import embedders
from retro_jax.retrieval import formats
from retro_jax.retrieval import pipeline
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.utils.io import atomic_write_jsonl, read_jsonl


def fact_completion_prompts(heldout_path: Optional[str], updates: Sequence[Mapping[str, Any]]
                            ) -> tuple[list[str], list[Mapping[str, Any]]]:
  """The knowledge update as language modelling: for each changed fact, the held-out
  document of its entity (not in the DB) up to the fact's old value, e.g. "Krabre Rakro
  was an instrument maker from Kekribe, who lived from 1805 to". Returns (prompts,
  their update rows); facts whose value the held-out text does not state are left out.
  """
  if not heldout_path:
    return [], []
  heldout = {d.get("entity"): d["text"] for _, d in read_jsonl(heldout_path)}
  prompts, rows = [], []
  for update in updates:
    text = heldout.get(update["entity"], "")
    position = text.find(update["old"])
    if position > 0:
      prompts.append(text[:position].rstrip())
      rows.append(update)
  return prompts, rows


def fact_completion_scores(generator: Any, retriever: Any, prompts: Sequence[str],
                           updates: Sequence[Mapping[str, Any]], output_path: str,
                           max_new_tokens: int = 10) -> dict[str, float]:
  """Greedy continuations of ``prompts`` by a Retro LM retrieving from ``retriever``
  (prompts aligned to a chunk boundary, so their last chunk is retrieved first); how
  often they state the new value, and how often the old one."""
  result = generator.generate(list(prompts), max_new_tokens=max_new_tokens,
                              retriever=retriever, align_prompts=True)
  rows = [{"prompt": p, "completion": t, "old": u["old"], "new": u["new"],
           "follows_new": u["new"] in t, "keeps_old": u["old"] in t}
          for p, t, u in zip(prompts, result.texts, updates)]
  atomic_write_jsonl(output_path, rows)
  return {"follows_new": float(np.mean([r["follows_new"] for r in rows])),
          "keeps_old": float(np.mean([r["keeps_old"] for r in rows])), "count": len(rows)}


def knowledge_update_scores(predictions_path: str, updates: Sequence[Mapping[str, Any]]
                            ) -> dict[str, float]:
  """How often answers follow the new facts (and how often they keep the old ones)."""
  rows = [row for _, row in read_jsonl(predictions_path)]
  if len(rows) != len(updates):
    raise ValueError(f"{predictions_path}: {len(rows)} predictions for {len(updates)} "
                     "updated facts")
  new = [exact_match(r["prediction"], u["new_answers"]) for r, u in zip(rows, updates)]
  old = [exact_match(r["prediction"], u["old_answers"]) for r, u in zip(rows, updates)]
  return {"follows_new": float(np.mean(new)), "keeps_old": float(np.mean(old)),
          "count": len(rows)}


def build_updated_retrieval(original_dir: str, updated_corpus: str, output_dir: str
                            ) -> dict[str, Any]:
  """A retrieval directory for ``updated_corpus`` with the original's vocabulary,
  embedder and settings; chunks whose text did not change reuse their embeddings."""
  original = RetrievalLayout(original_dir)
  config = original.read_config()
  base = embedders.load_embedder(config["embedder"])
  chunk_embedder = embedders.ChunkEmbedder(base, original.vocab_path)
  db = formats.ChunkDB(original.retrieval_db_prefix)
  vectors = formats.Embeddings(original.embeddings_dir)
  texts = chunk_embedder.texts(db.get_chunks(np.arange(db.num_chunks),
                                             with_continuation=False))
  cache = dict(zip(texts, vectors.get(0, db.num_chunks)))
  embedder = embedders.MemoizedEmbedder(base, cache)
  pipeline.preprocess(updated_corpus, output_dir, vocab=original.vocab_path,
                      embedder=embedder, **pipeline.rebuild_settings(config))
  logging.info("knowledge update: %d of %d chunk texts embedded anew",
               embedder.misses, embedder.calls)
  return {"retrieval_dir": output_dir, "embedded_anew": embedder.misses,
          "chunk_texts": embedder.calls}
