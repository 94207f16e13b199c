"""The corpus stage: ``generate_corpus`` writes the encyclopedia's files.

See the package docstring for the files and splits.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Mapping, Sequence

from absl import logging
import gin

from retro_jax.data.encyclopedia.documents import (document_record, plan_document,
                                                   qa_rows, question, render)
from retro_jax.data.encyclopedia.knowledge_base import SPLITS, KnowledgeBase, draw_updates
from retro_jax.data.encyclopedia.templates import TEMPLATES, TYPES
from retro_jax.utils.io import Manifest, atomic_path, atomic_write_jsonl

VERSION = 2
FILES = {
    "pretrain": "pretrain.jsonl",
    "retrofit": "retrofit.jsonl",
    "retrieval": "retrieval.jsonl",
    "heldout": "heldout.jsonl",
    "sft_qa": "sft_qa.jsonl",
    "qa_test": "qa_test.jsonl",
    "updates": "updates.jsonl",
    "retrieval_updated": "retrieval_updated.jsonl",
    "kb": "kb.json",
}


def corpus_paths(output_dir: str | os.PathLike) -> dict[str, str]:
  """Paths of the files ``generate_corpus`` writes (keys of ``FILES``)."""
  return {key: os.path.join(os.fspath(output_dir), name) for key, name in FILES.items()}


def _text_stats(docs: Sequence[Mapping[str, str]]) -> dict[str, int]:
  words = [len(d["text"].split()) for d in docs]
  return {"documents": len(docs), "words": sum(words),
          "characters": sum(len(d["text"]) for d in docs),
          "min_words": min(words, default=0), "max_words": max(words, default=0)}


@gin.configurable
def generate_corpus(output_dir: str | os.PathLike, *, scale: float = 1.0, seed: int = 0,
                    heldout_template: str = "article", update_fraction: float = 0.22,
                    retrofit_fraction: float = 0.5, questions_per_fact: int = 1,
                    overwrite: bool = False
                    ) -> dict[str, Any]:
  """Writes the fictional-encyclopedia corpus to ``output_dir`` (see the module doc).

  Args:
    output_dir: Directory for the files of ``FILES`` and a manifest.
    scale: Multiplies the number of entities (0.1 for fast tests).
    seed: All randomness derives from it; same (seed, scale) -> identical files.
    heldout_template: The template of db-only entities kept out of the DB.
    update_fraction: Fraction of db-only entities the knowledge update changes.
    retrofit_fraction: Fraction of the seen entities whose documents form
      ``retrofit.jsonl`` instead of ``pretrain.jsonl``.
    questions_per_fact: Question phrasings per (entity, attribute), 1-3.
    overwrite: Regenerate even if the manifest says the corpus is complete.
  Returns:
    ``{"output_dir", "paths": {key: path}, "counts": {...}, "seconds"}``.
  """
  if heldout_template not in TEMPLATES:
    raise ValueError(f"heldout_template must be one of {TEMPLATES}, got "
                     f"{heldout_template!r}")
  if not 1 <= questions_per_fact <= 3:
    raise ValueError(f"questions_per_fact must be 1, 2 or 3, got {questions_per_fact}")
  if not 0 < update_fraction <= 1:
    raise ValueError(f"update_fraction must be in (0, 1], got {update_fraction}")
  if not 0 < retrofit_fraction < 1:
    raise ValueError(f"retrofit_fraction must be in (0, 1), got {retrofit_fraction}")
  output_dir = os.fspath(output_dir)
  paths = corpus_paths(output_dir)
  settings = {"version": VERSION, "scale": scale, "seed": seed,
              "heldout_template": heldout_template, "update_fraction": update_fraction,
              "retrofit_fraction": retrofit_fraction,
              "questions_per_fact": questions_per_fact}
  manifest = Manifest(output_dir, settings)
  if manifest.is_done("corpus") and not overwrite:
    info = manifest.info("corpus")
    logging.info("encyclopedia corpus in %s is complete; not regenerating", output_dir)
    return {"output_dir": output_dir, "paths": paths, "counts": info["counts"],
            "seconds": info["seconds"]}
  start = time.perf_counter()
  kb = KnowledgeBase(scale, seed)
  plans = {(e.id, t): plan_document(e, t, seed) for e in kb.entities for t in TEMPLATES}
  docs = {key: document_record(kb.by_id[key[0]], key[1], render(plan, kb.by_id[key[0]]))
          for key, plan in plans.items()}
  seen = [e for e in kb.entities if e.split == "seen"]
  db_only = [e for e in kb.entities if e.split == "db_only"]
  # A seeded, type-stratified part of the seen entities is the retro-fitting text.
  fresh = set()
  for kind in TYPES:
    of_kind = [e.id for e in seen if e.type == kind]
    count = min(len(of_kind) - 1, max(1, round(retrofit_fraction * len(of_kind))))
    fresh.update(random.Random(f"{seed}:retrofit:{kind}").sample(of_kind, count))
  # Shuffled so that the documents of one entity are far apart in the training stream.
  pretrain = [docs[e.id, t] for e in seen if e.id not in fresh for t in TEMPLATES]
  random.Random(f"{seed}:order:pretrain").shuffle(pretrain)
  retrofit = [docs[e.id, t] for e in seen if e.id in fresh for t in TEMPLATES]
  random.Random(f"{seed}:order:retrofit").shuffle(retrofit)
  db_extra = [docs[e.id, t] for e in db_only for t in TEMPLATES if t != heldout_template]
  random.Random(f"{seed}:order:retrieval").shuffle(db_extra)
  retrieval = retrofit + pretrain + db_extra
  heldout = [docs[e.id, heldout_template] for e in db_only]
  sft = [row for e in seen for row in qa_rows(e, seed, questions_per_fact)]
  qa_test = [row for e in db_only for row in qa_rows(e, seed, questions_per_fact)]

  updates = draw_updates(kb, update_fraction)
  update_rows = []
  for entity_id, changed in updates.items():
    entity = kb.by_id[entity_id]
    for attr, new in changed.items():
      rng = random.Random(f"{seed}:{entity_id}:update:{attr}")
      update_rows.append({"entity": entity_id, "title": entity.name, "type": entity.type,
                          "attribute": attr, "old": entity.facts[attr], "new": new,
                          "question": question(entity, attr, rng),
                          "old_answers": [entity.facts[attr]], "new_answers": [new]})
  retrieval_updated = []
  for doc in retrieval:
    changed = updates.get(doc["entity"])
    if changed:
      entity = kb.by_id[doc["entity"]]
      doc = dict(doc, text=render(plans[entity.id, doc["template"]], entity,
                                  {**entity.facts, **changed}))
    retrieval_updated.append(doc)

  kb_json = {
      "version": VERSION, "seed": seed, "scale": scale, "templates": list(TEMPLATES),
      "heldout_template": heldout_template,
      "entities": [{"id": e.id, "type": e.type, "name": e.name, "split": e.split,
                    "facts": e.facts, "links": e.links} for e in kb.entities],
  }
  atomic_write_jsonl(paths["pretrain"], pretrain)
  atomic_write_jsonl(paths["retrofit"], retrofit)
  atomic_write_jsonl(paths["retrieval"], retrieval)
  atomic_write_jsonl(paths["heldout"], heldout)
  atomic_write_jsonl(paths["sft_qa"], sft)
  atomic_write_jsonl(paths["qa_test"], qa_test)
  atomic_write_jsonl(paths["updates"], update_rows)
  atomic_write_jsonl(paths["retrieval_updated"], retrieval_updated)
  with atomic_path(paths["kb"]) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(kb_json, f, ensure_ascii=False, indent=1)
      f.write("\n")

  counts = {
      "entities": {split: {kind: sum(1 for e in kb.entities
                                     if e.split == split and e.type == kind)
                           for kind in TYPES} for split in SPLITS},
      "facts": {split: sum(len(e.facts) for e in kb.entities if e.split == split)
                for split in SPLITS},
      "pretrain": _text_stats(pretrain),
      "retrofit": _text_stats(retrofit),
      "retrieval": _text_stats(retrieval),
      "heldout": _text_stats(heldout),
      "sft_qa": len(sft), "qa_test": len(qa_test),
      "updates": {"entities": len(updates), "facts": len(update_rows)},
  }
  for split in SPLITS:
    counts["entities"][split]["total"] = sum(counts["entities"][split].values())
  seconds = round(time.perf_counter() - start, 3)
  manifest.mark_done("corpus", list(FILES.values()),
                     {"counts": counts, "seconds": seconds})
  logging.info("encyclopedia corpus: %d seen + %d db-only entities, %d pretraining "
               "documents (%d words) in %.1fs -> %s",
               counts["entities"]["seen"]["total"], counts["entities"]["db_only"]["total"],
               counts["pretrain"]["documents"], counts["pretrain"]["words"], seconds,
               output_dir)
  return {"output_dir": output_dir, "paths": paths, "counts": counts, "seconds": seconds}


def format_summary(result: Mapping[str, Any]) -> str:
  """A README-style table of the counts ``generate_corpus`` returns."""
  c = result["counts"]
  lines = [f"Fictional encyclopedia in {result['output_dir']} "
           f"(generated in {result['seconds']:.1f}s)", "",
           "| entities | " + " | ".join(TYPES) + " | total |",
           "|---|" + "---:|" * (len(TYPES) + 1)]
  for split in SPLITS:
    row = c["entities"][split]
    lines.append(f"| {split} | " + " | ".join(str(row[k]) for k in TYPES)
                 + f" | {row['total']} |")
  lines += ["", "| file | documents | words | characters | words/doc (min-max) |",
            "|---|---:|---:|---:|---|"]
  for key in ("pretrain", "retrofit", "retrieval", "heldout"):
    s = c[key]
    lines.append(f"| {FILES[key]} | {s['documents']} | {s['words']} | "
                 f"{s['characters']} | {s['min_words']}-{s['max_words']} |")
  lines += ["", f"QA: {c['sft_qa']} SFT questions (seen entities), {c['qa_test']} test "
            f"questions (db-only entities); knowledge update: {c['updates']['facts']} "
            f"facts of {c['updates']['entities']} db-only entities."]
  return "\n".join(lines)
