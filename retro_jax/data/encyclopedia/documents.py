"""The encyclopedia's documents and questions, written from the knowledge base.

Four templates (writing styles) per entity type render every fact of the entity, one
fact per sentence, in the template's order and phrasings, plus fact-free or
fact-repeating sentences until a document is long enough. A document is first planned
with placeholders (``plan_document``) and then filled (``render``), so a knowledge
update re-renders the same plan with new values.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Optional

from retro_jax.data.encyclopedia.knowledge_base import Entity
from retro_jax.data.encyclopedia.templates import (
    ARTICLE_ATTRS, ECHOES, FACTSHEET, FACTSHEET_FRAMES, FILLERS, FRAMES, LEADS, PHRASES,
    PROFILE_ORDER, QUESTIONS, STYLE_VARIANTS, TEMPLATES)
from retro_jax.data.encyclopedia.text import article, title_case

MIN_WORDS, MAX_WORDS = 120, 220
_TARGET_WORDS = 124          # fillers are added until a document reaches this length


def _fill_values(entity: Entity, facts: Mapping[str, str]) -> dict[str, str]:
  values = dict(entity.refs())
  values.update(facts)
  for attr in ARTICLE_ATTRS:
    if attr in facts:
      values[f"{attr}_a"] = f"{article(facts[attr])} {facts[attr]}"
  return values


def _placeholders(text: str) -> list[str]:
  """Attribute names a template sentence uses ({occupation_a} counts as occupation)."""
  names = re.findall(r"\{(\w+)\}", text)
  return [n[:-2] if n.endswith("_a") else n for n in names if n not in "nNsS"]


def _fact_sentence(entity: Entity, attr: str, template: str, rng: random.Random) -> str:
  if template == "factsheet":
    label, value = FACTSHEET[entity.type][attr]
    frame = rng.choice(FACTSHEET_FRAMES)
    sentence = frame.replace("{label}", label).replace("{value}", value)
  else:
    sentence = PHRASES[entity.type][attr][rng.choice(STYLE_VARIANTS[template])]
  if sentence.startswith("{n}"):
    sentence = "{N}" + sentence[3:]
  elif sentence.startswith("{s}"):
    sentence = "{S}" + sentence[3:]
  return title_case(sentence)


def plan_document(entity: Entity, template: str, seed: int) -> str:
  """The document with placeholders for the entity's values (see ``render``).

  A pure function of (seed, entity id, template) and the entity's values; a knowledge
  update fills the same plan with new values, so only those values change.
  """
  rng = random.Random(f"{seed}:{entity.id}:{template}")
  kind = entity.type
  attrs = list(entity.facts)
  if template == "article":
    order = attrs
  elif template == "profile":
    order = [a for a in PROFILE_ORDER[kind] if a in entity.facts]
  elif template == "factsheet":
    order = sorted(attrs, key=lambda a: FACTSHEET[kind][a][0])
  elif template == "note":
    order = attrs[:]
    rng.shuffle(order)
  else:
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
  intros, closings = FRAMES[kind][template]
  sentences = ([rng.choice(LEADS[kind] if template == "article" else intros)]
               + [_fact_sentence(entity, a, template, rng) for a in order])
  closing = rng.choice(closings)
  fillers = list(FILLERS[kind]) + [
      e for e in ECHOES[kind] if set(_placeholders(e)) <= set(entity.facts)]
  rng.shuffle(fillers)
  values = _fill_values(entity, entity.facts)
  words = lambda: len(" ".join(sentences + [closing]).format_map(values).split())  # pylint: disable=unnecessary-lambda-assignment
  while words() < _TARGET_WORDS and fillers:
    sentences.insert(rng.randint(2, len(sentences)), fillers.pop())
  return " ".join(sentences + [closing])


def render(plan: str, entity: Entity, facts: Optional[Mapping[str, str]] = None) -> str:
  return plan.format_map(_fill_values(entity, entity.facts if facts is None else facts))


def document_record(entity: Entity, template: str, text: str) -> dict[str, str]:
  return {"id": f"{entity.id}:{template}", "title": entity.name, "entity": entity.id,
          "type": entity.type, "template": template, "split": entity.split,
          "text": text}


def question(entity: Entity, attr: str, rng: random.Random) -> str:
  return rng.choice(QUESTIONS[entity.type][attr]).format_map(entity.refs())


def qa_rows(entity: Entity, seed: int, per_fact: int) -> list[dict[str, Any]]:
  rows = []
  for attr, value in entity.facts.items():
    rng = random.Random(f"{seed}:{entity.id}:question:{attr}")
    phrasings = list(QUESTIONS[entity.type][attr])
    rng.shuffle(phrasings)
    for phrasing in phrasings[:per_fact]:
      rows.append({"question": phrasing.format_map(entity.refs()), "answers": [value],
                   "entity": entity.id, "title": entity.name, "type": entity.type,
                   "attribute": attr})
  return rows

