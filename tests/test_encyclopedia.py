"""The embedded fictional encyclopedia: determinism, splits, leaks, QA, knowledge update."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest

from retro_jax.data import encyclopedia as enc
from retro_jax.data.encyclopedia import templates as tables
from retro_jax.utils.io import read_jsonl

SCALE = 0.1
RELATIONS = {  # attribute -> type of the entity it names
    "birth_city": "city", "mentor": "person", "employer": "organisation",
    "river": "river", "source": "mountain", "first_ascent_by": "person",
    "nearest_city": "city", "founder": "person", "hq_city": "city"}


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("enc")
  result = enc.generate_corpus(out, scale=SCALE, seed=0)
  data = {k: [row for _, row in read_jsonl(p)] for k, p in result["paths"].items() if k != "kb"}
  with open(result["paths"]["kb"], encoding="utf-8") as f:
    data["kb"] = json.load(f)
  data["entities"] = {e["id"]: e for e in data["kb"]["entities"]}
  data["result"] = result
  return data


def name_word(entity):
  words = entity["name"].split()
  return words[0] if entity["type"] in ("city", "river", "organisation") else words[-1]


def test_same_seed_identical_bytes_other_seed_differs(corpus, tmp_path):
  first = corpus["result"]["paths"]
  again = enc.generate_corpus(tmp_path / "again", scale=SCALE, seed=0)["paths"]
  for key in enc.FILES:
    assert read_bytes(first[key]) == read_bytes(again[key]), key
  other = enc.generate_corpus(tmp_path / "other", scale=SCALE, seed=1)["paths"]
  for key in ("pretrain", "retrofit", "retrieval", "kb", "sft_qa"):
    assert read_bytes(first[key]) != read_bytes(other[key]), key


def test_retrieval_is_retrofit_pretrain_then_db_only_without_heldout(corpus):
  pretrain, retrieval, heldout = corpus["pretrain"], corpus["retrieval"], corpus["heldout"]
  retrofit = corpus["retrofit"]
  entities, held = corpus["entities"], corpus["kb"]["heldout_template"]
  assert retrieval[:len(retrofit)] == retrofit      # training documents come first
  assert retrieval[len(retrofit):len(retrofit) + len(pretrain)] == pretrain
  seen = [e for e in entities.values() if e["split"] == "seen"]
  db_only = [e for e in entities.values() if e["split"] == "db_only"]
  assert sorted(d["id"] for d in pretrain + retrofit) == sorted(
      f"{e['id']}:{t}" for e in seen for t in enc.TEMPLATES)
  pretrain_entities = {d["entity"] for d in pretrain}
  retrofit_entities = {d["entity"] for d in retrofit}
  assert not pretrain_entities & retrofit_entities   # the GPT never reads retrofit text
  for kind in enc.TYPES:   # about half of every type, at least one on each side
    fresh = sum(entities[e]["type"] == kind for e in retrofit_entities)
    total = sum(e["type"] == kind for e in seen)
    assert 1 <= fresh <= total - 1 and abs(fresh - total / 2) <= 1, kind
  assert sorted(d["id"] for d in retrieval[len(pretrain) + len(retrofit):]) == sorted(
      f"{e['id']}:{t}" for e in db_only for t in enc.TEMPLATES if t != held)
  assert sorted(d["id"] for d in heldout) == sorted(f"{e['id']}:{held}" for e in db_only)
  retrieval_texts = {d["text"] for d in retrieval}
  assert not any(d["text"] in retrieval_texts for d in heldout)
  for doc in pretrain + retrieval + heldout:
    assert doc["split"] == entities[doc["entity"]]["split"]
    assert doc["title"] == entities[doc["entity"]]["name"]
  # The training stream interleaves entities: no two neighbouring documents share one.
  assert sum(a["entity"] == b["entity"] for a, b in zip(pretrain, pretrain[1:])) < (
      len(pretrain) // 10)


def test_db_only_facts_and_names_never_in_pretraining_text(corpus):
  entities = corpus["entities"].values()
  holders = collections.defaultdict(set)   # who has this value (or this name)
  for e in entities:
    holders[e["name"]].add(e["id"])
    for value in e["facts"].values():
      holders[value].add(e["id"])
  pretrain = "\n".join(d["text"] for d in corpus["pretrain"] + corpus["retrofit"])
  training = len(corpus["pretrain"]) + len(corpus["retrofit"])
  retrieval_db_part = "\n".join(d["text"] for d in corpus["retrieval"][training:])
  checked = 0
  for e in entities:
    if e["split"] != "db_only":
      continue
    for phrase in (e["name"], name_word(e)):
      assert not enc.contains(pretrain, phrase), (e["id"], phrase)
      assert enc.contains(retrieval_db_part, phrase)
    for attr, value in e["facts"].items():
      if holders[value] == {e["id"]}:
        assert not enc.contains(pretrain, value), (e["id"], attr, value)
        assert enc.contains(retrieval_db_part, value)
        checked += 1
  assert checked > 50          # the check covers most db-only facts, not a few


def test_every_document_states_every_fact_and_names_the_entity(corpus):
  for doc in corpus["retrieval"] + corpus["heldout"]:
    entity = corpus["entities"][doc["entity"]]
    text = doc["text"]
    assert enc.MIN_WORDS <= len(text.split()) <= enc.MAX_WORDS, doc["id"]
    for attr, value in entity["facts"].items():
      assert enc.contains(text, value), (doc["id"], attr, value)
    for sentence in re.split(r'(?<=[.!?])"?\s+', text):
      assert name_word(entity) in sentence, (doc["id"], sentence)
  # The four templates of an entity differ, and documents differ between entities.
  by_entity = collections.defaultdict(set)
  for doc in corpus["retrieval"] + corpus["heldout"]:
    by_entity[doc["entity"]].add(doc["text"])
  assert all(len(texts) == len(enc.TEMPLATES) for texts in by_entity.values())


def test_kb_is_consistent(corpus):
  entities = corpus["entities"]
  words = collections.Counter(name_word(e) for e in entities.values())
  assert max(words.values()) == 1
  assert len({e["name"] for e in entities.values()}) == len(entities)
  year = lambda e, a: int(e["facts"][a])  # pylint: disable=unnecessary-lambda-assignment
  for e in entities.values():
    assert 5 <= len(e["facts"]) <= 8, e["id"]
    assert list(e["facts"]) == [a for a in tables.ARTICLE_ORDER[e["type"]] if a in e["facts"]]
    for attr, target_id in e["links"].items():
      target = entities[target_id]
      assert target["type"] == RELATIONS[attr] and target["split"] == "seen"
      assert e["facts"][attr] == target["name"]
    assert set(e["links"]) == set(e["facts"]) & set(RELATIONS)
    if e["type"] == "person":
      assert 48 <= year(e, "death_year") - year(e, "birth_year") <= 93
      if "mentor" in e["links"]:
        mentor = entities[e["links"]["mentor"]]
        assert 15 <= year(e, "birth_year") - year(mentor, "birth_year") <= 50
      if "employer" in e["links"]:
        assert year(entities[e["links"]["employer"]], "founded_year") <= year(
            e, "death_year")
    if e["type"] == "organisation":
      founder = entities[e["links"]["founder"]]
      assert year(founder, "birth_year") + 25 <= year(e, "founded_year") < year(
          founder, "death_year")
    if e["type"] == "mountain":
      climber = entities[e["links"]["first_ascent_by"]]
      assert year(climber, "birth_year") + 18 <= year(e, "first_ascent_year") < year(
          climber, "death_year")
    if e["type"] == "city":
      assert re.fullmatch(r"\d{1,3}(,\d{3})+", e["facts"]["population"])


def test_qa_answers_are_in_the_entity_documents(corpus):
  docs = collections.defaultdict(list)
  for doc in corpus["retrieval"]:
    docs[doc["entity"]].append(doc["text"])
  for key, split in (("sft_qa", "seen"), ("qa_test", "db_only")):
    rows = corpus[key]
    facts = {(e["id"], a) for e in corpus["entities"].values() if e["split"] == split
             for a in e["facts"]}
    assert {(r["entity"], r["attribute"]) for r in rows} == facts
    for row in rows:
      entity = corpus["entities"][row["entity"]]
      assert row["answers"] == [entity["facts"][row["attribute"]]]
      assert row["title"] in row["question"] and row["question"].endswith("?")
      assert any(enc.contains(text, row["answers"][0]) for text in docs[row["entity"]])
    # Several phrasings per attribute are in use.
    phrasings = collections.defaultdict(set)
    for row in rows:
      phrasings[row["type"], row["attribute"]].add(row["question"].replace(row["title"], "X"))
    assert sum(len(p) > 1 for p in phrasings.values()) > len(phrasings) // 2


def test_knowledge_update_changes_only_the_updated_values(corpus):
  entities, updates = corpus["entities"], corpus["updates"]
  db_only = [e for e in entities.values() if e["split"] == "db_only"]
  updated = {u["entity"] for u in updates}
  assert 0.15 * len(db_only) <= len(updated) <= 0.3 * len(db_only)
  changed = collections.defaultdict(dict)
  for u in updates:
    entity = entities[u["entity"]]
    assert entity["split"] == "db_only" and u["attribute"] in tables.UPDATABLE[entity["type"]]
    assert u["old"] == entity["facts"][u["attribute"]] != u["new"]
    assert (u["old_answers"], u["new_answers"]) == ([u["old"]], [u["new"]])
    assert entity["name"] in u["question"]
    if u["attribute"] in RELATIONS:   # a new relation names a seen entity of the type
      assert any(t["name"] == u["new"] and t["split"] == "seen"
                 and t["type"] == RELATIONS[u["attribute"]] for t in entities.values())
    changed[u["entity"]][u["old"]] = u["new"]
  before, after = corpus["retrieval"], corpus["retrieval_updated"]
  assert len(before) == len(after)
  for old_doc, new_doc in zip(before, after):
    assert {k: v for k, v in old_doc.items() if k != "text"} == {
        k: v for k, v in new_doc.items() if k != "text"}
    if old_doc["entity"] not in changed:
      assert old_doc == new_doc
      continue
    text = new_doc["text"]
    for old, new in changed[old_doc["entity"]].items():
      assert enc.contains(text, new) and not enc.contains(text, old), old_doc["id"]
      text = text.replace(new, old)
    assert text == old_doc["text"]   # nothing but the updated values changed


def test_scale_changes_counts(corpus, tmp_path):
  small = corpus["result"]["counts"]
  larger = enc.generate_corpus(tmp_path, scale=2 * SCALE, seed=0)["counts"]
  for split in enc.SPLITS:
    for kind in enc.TYPES:
      assert larger["entities"][split][kind] >= small["entities"][split][kind]
    assert larger["entities"][split]["total"] > 1.6 * small["entities"][split]["total"]
  assert (larger["pretrain"]["documents"] + larger["retrofit"]["documents"]
          == 4 * larger["entities"]["seen"]["total"])
  assert small["pretrain"]["documents"] == len(corpus["pretrain"])
  assert small["heldout"]["documents"] == small["entities"]["db_only"]["total"]
  with pytest.raises(ValueError, match="scale"):
    enc.generate_corpus(tmp_path / "bad", scale=0.0)
  with pytest.raises(ValueError, match="retrofit_fraction"):
    enc.generate_corpus(tmp_path / "bad", retrofit_fraction=1.0)


def test_templates_never_contain_pool_values():
  templates = []
  for table in (tables.PHRASES, tables.QUESTIONS):
    templates += [t for per_type in table.values() for ts in per_type.values() for t in ts]
  for per_type in tables.FRAMES.values():
    templates += [t for intros, closings in per_type.values() for t in intros + closings]
  templates += [t for ts in list(tables.FILLERS.values()) + list(tables.ECHOES.values())
                + list(tables.LEADS.values()) for t in ts]
  templates += [t for per_type in tables.FACTSHEET.values() for pair in per_type.values()
                for t in pair]
  templates += list(tables.FACTSHEET_FRAMES)
  text = "\n".join(templates)
  pools = (tables.OCCUPATIONS + tables.INDUSTRIES + tables.FIELDS + tables.NICKNAMES
           + tables.DISHES
           + tables.RIVER_FEATURES + tables.MOUNTAIN_FEATURES
           + tuple(f"{a} and {b}" for a in tables.MOTTO_WORDS for b in tables.MOTTO_WORDS)
           + tuple(f"{a} {b}" for a in tables.EMBLEM_COLOURS for b in tables.EMBLEM_ANIMALS)
           + tuple(f"The {a} {b}" for a in tables.WORK_ADJECTIVES for b in tables.WORK_NOUNS)
           + tuple(f"{a} {b}" for a in tables.LANDMARK_ADJECTIVES
                   for b in tables.LANDMARK_BUILDINGS))
  found = [v for v in pools if v in text and enc.contains(text, v)]
  assert not found
  for kind in enc.TYPES:   # every prose sentence names the entity
    for ts in list(tables.PHRASES[kind].values()) + [tables.FILLERS[kind], tables.ECHOES[kind]]:
      assert all(re.search(r"\{[nNsS]\}", t) for t in ts)


def test_manifest_resumes_and_rejects_other_settings(corpus):
  result = corpus["result"]
  path = result["paths"]["pretrain"]
  mtime = os.stat(path).st_mtime_ns
  again = enc.generate_corpus(result["output_dir"], scale=SCALE, seed=0)
  assert again["counts"] == json.loads(json.dumps(result["counts"]))
  assert os.stat(path).st_mtime_ns == mtime
  with pytest.raises(ValueError, match="settings"):
    enc.generate_corpus(result["output_dir"], scale=SCALE, seed=5)


def test_command_line_with_gin_binding(corpus, tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.data.encyclopedia", f"--output_dir={out}",
       f"--scale={SCALE}", "--gin.generate_corpus.seed=1"],
      capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert "pretrain.jsonl" in proc.stdout and "db_only" in proc.stdout
  with open(out / "manifest.json", encoding="utf-8") as f:
    assert json.load(f)["settings"]["seed"] == 1
  assert read_bytes(out / "pretrain.jsonl") != read_bytes(corpus["result"]["paths"]["pretrain"])
