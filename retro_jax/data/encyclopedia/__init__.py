r"""The embedded default corpus: a fictional encyclopedia in which retrieval matters.

    python -m retro_jax.data.encyclopedia --output_dir=DIR [--scale=1.0] [--seed=0]
    generate_corpus(output_dir, *, scale=1.0, seed=0) -> {"paths": ..., "counts": ...}

A download-free, deterministic stand-in for a real corpus: the same ``(seed, scale)``
gives byte-identical files on every machine (all randomness comes from
``random.Random`` seeded with strings, which Python hashes with SHA-512, never from
``hash()`` or set order).

**Knowledge base.** Fictional entities of five types (person, city, river, mountain,
organisation), each with 5-8 attributes: years, numbers, occupations and other pool
values, and relations to other entities (a person's birth city is a city of the KB,
an organisation's founder a person aged 25-60 and alive at the founding, a mountain's
first climber a person aged 18-55 and alive at the first ascent...). Names are built from
syllables; every name word is used once in the whole KB (persons may share given
names). Relations always point to *seen* entities, so the name of a db-only entity
appears only in its own documents.

**Documents.** Four templates (writing styles) per entity type: ``article``
(encyclopedia entry), ``profile`` (short portrait), ``factsheet`` (infobox as prose)
and ``note`` (news or travel-guide note). Each renders every fact of the entity, one
fact per sentence (the article also opens with a lead sentence summing up key facts),
in its own order and with its own phrasings (several per fact and style), plus
fact-free or fact-repeating sentences up to 124-140 words per document; every sentence names the entity, so every
64-token chunk is about an identifiable entity.

**Splits and files** (jsonl, one object per line with ``text`` plus ``id``, ``title``,
``entity``, ``type``, ``template``, ``split``):

* ``pretrain.jsonl``: every template of the *seen* entities outside the retro-fitting
  part (GPT pretraining text).
* ``retrofit.jsonl``: every template of the other seen entities (``retrofit_fraction``,
  half by default, stratified by type): text the GPT has not read, for retro-fitting
  and GPT-fitting, so that the retro-fit model gains from its neighbors rather than
  from what the decoder already memorised.
* ``retrieval.jsonl``: the retrieval corpus: all of ``retrofit.jsonl`` first, in the
  same order (the neighbor stage needs the training documents to be the first
  documents of the DB), then ``pretrain.jsonl``, then the *db-only* entities in every
  template but the held-out one. Facts of db-only entities exist only here.
* ``heldout.jsonl``: the db-only entities in the held-out template (validation text
  whose facts are in the DB but whose own text is not).
* ``sft_qa.jsonl`` / ``qa_test.jsonl``: short-answer questions about seen / db-only
  entities: ``{"question", "answers", "entity", "title", "type", "attribute"}``; the
  answers are the value strings exactly as the documents write them.
* ``updates.jsonl`` and ``retrieval_updated.jsonl``: a knowledge update. For about
  22% of the db-only entities one or two attributes get new consistent values;
  ``updates.jsonl`` has ``{"entity", "title", "attribute", "old", "new", "question",
  "old_answers", "new_answers"}`` per changed fact, and ``retrieval_updated.jsonl`` is
  ``retrieval.jsonl`` with those entities' documents re-rendered (same documents, same
  order, same wording; only the changed values differ).
* ``kb.json``: the knowledge base (entities with facts and relation targets).

At ``scale=1.0`` there are 252 seen and 168 db-only entities and ~0.8 MB of
pretraining text (about 225k tokens of a SentencePiece vocabulary trained on it); ``scale`` multiplies the entity counts. The outputs are recorded in
a ``Manifest``; a re-run with the same settings returns the recorded result.

Nothing else in retro_jax depends on these internals: any jsonl corpus with a
``text`` key can replace these files in the recipe.

Modules: ``templates`` (the literal tables: types, templates, value pools, phrasings),
``text`` (wording helpers), ``knowledge_base`` (entities and the update sampler),
``documents`` (documents and questions), ``stage`` (``generate_corpus``) and
``__main__`` (the command line). This package exports the public API.
"""

from retro_jax.data.encyclopedia.documents import MAX_WORDS, MIN_WORDS, plan_document, render
from retro_jax.data.encyclopedia.knowledge_base import SPLITS, Entity, check_entity
from retro_jax.data.encyclopedia.stage import (FILES, VERSION, corpus_paths, format_summary,
                                               generate_corpus)
from retro_jax.data.encyclopedia.templates import TEMPLATES, TYPES
from retro_jax.data.encyclopedia.text import contains

__all__ = [
    "FILES", "MAX_WORDS", "MIN_WORDS", "SPLITS", "TEMPLATES", "TYPES", "VERSION", "Entity",
    "check_entity", "contains", "corpus_paths", "format_summary", "generate_corpus",
    "plan_document", "render",
]
