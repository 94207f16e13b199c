"""The encyclopedia's knowledge base: fictional entities and their facts.

Entities of the five types get 5-8 attributes each, drawn from the pools of
``templates`` by a seeded sampler that keeps relations consistent (a person's birth
city is a city of the KB, an organisation's founder a person aged 25-60 and alive at
the founding...). Relations always point to *seen* entities. ``draw_updates`` picks
the knowledge update's new values with the same sampler.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, Optional, Sequence

from retro_jax.data.encyclopedia.templates import (
    ARTICLE_ATTRS, ARTICLE_ORDER, BLOCKED_NAMES, CODAS, DISHES, EMBLEM_ANIMALS,
    EMBLEM_COLOURS, FIELDS, INDUSTRIES, LANDMARK_ADJECTIVES, LANDMARK_BUILDINGS,
    MOTTO_WORDS, MOUNTAIN_FEATURES, NICKNAMES, OCCUPATIONS, ONSETS, ORG_KINDS,
    RIVER_FEATURES, TYPES, UPDATABLE, VOWELS, WORK_ADJECTIVES, WORK_NOUNS)
from retro_jax.data.encyclopedia.text import article, contains, group_digits, title_case

SPLITS = ("seen", "db_only")
# Entities per type at scale 1.0 (about 60% seen, 40% db-only).
BASE_COUNTS = {"person": 168, "city": 84, "river": 50, "mountain": 50, "organisation": 68}
MIN_PER_TYPE = 4
DB_ONLY_FRACTION = 0.4



@dataclasses.dataclass
class Entity:
  """One entity: ``facts`` maps attribute -> value string as the documents write it;
  ``links`` maps relation attributes -> the target entity's id."""
  id: str
  type: str
  name: str
  split: str
  facts: dict[str, str]
  links: dict[str, str] = dataclasses.field(default_factory=dict)
  given: str = ""          # persons: given name (the surname is their short form)

  @property
  def name_word(self) -> str:
    """The entity's unique name word (a person's surname)."""
    words = self.name.split()
    return words[0] if self.type in ("city", "river", "organisation") else words[-1]

  def refs(self) -> dict[str, str]:
    """{n}, {s} and their capitalised forms."""
    n = {"organisation": f"the {self.name}", "river": f"the {self.name}"}.get(
        self.type, self.name)
    s = {"person": self.name.split()[-1], "river": f"the {self.name_word}",
         "mountain": self.name_word}.get(self.type, n)
    return {"n": n, "N": title_case(n), "s": s, "S": title_case(s)}

  def year(self, attr: str) -> int:
    return int(self.facts[attr])


class _Names:
  """Unique pronounceable name words from syllables."""

  def __init__(self, rng: random.Random):
    self.rng = rng
    self.used: set[str] = set()

  def new(self, syllables: Sequence[int] = (2, 2, 3), coda: float = 0.6) -> str:
    for _ in range(10_000):
      count = self.rng.choice(syllables)
      word = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS)
                     for _ in range(count))
      if self.rng.random() < coda:
        word += self.rng.choice(CODAS)
      word = title_case(word)
      if (4 <= len(word) <= 11 and word not in self.used and word not in BLOCKED_NAMES
          and not re.search(r"(.)\1\1|[aeiou]{3}", word.lower())):
        self.used.add(word)
        return word
    raise RuntimeError("name space exhausted; add syllables")


def _entity_counts(scale: float) -> dict[str, tuple[int, int]]:
  """(seen, db_only) entities per type."""
  if not scale > 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  counts = {}
  for kind in TYPES:
    total = max(MIN_PER_TYPE, round(BASE_COUNTS[kind] * scale))
    db_only = min(total - 2, max(1, round(total * DB_ONLY_FRACTION)))
    counts[kind] = (total - db_only, db_only)
  return counts


class KnowledgeBase:
  """Builds the entities; ``draw(entity, attr, rng)`` samples one attribute value.

  The same sampler serves the first draw and knowledge updates, so an updated value
  obeys the same constraints (relations to seen entities, plausible years).
  """

  def __init__(self, scale: float, seed: int):
    self.seed = seed
    names = _Names(random.Random(f"{seed}:names"))
    n_places = max(4, round(12 * scale ** 0.5))
    self.regions = [names.new() for _ in range(n_places)]
    self.seas = [f"{names.new()} Sea" for _ in range(max(3, n_places // 2))]
    self.ranges = [f"{names.new()} Range" for _ in range(max(3, (2 * n_places) // 3))]
    counts = _entity_counts(scale)
    n_persons = sum(counts["person"])
    self.given_names = [names.new((2,), coda=0.4) for _ in range(max(12, n_persons // 4))]
    self.entities: list[Entity] = []
    split_rng = random.Random(f"{seed}:splits")
    for kind in TYPES:
      seen, db_only = counts[kind]
      db_indices = set(split_rng.sample(range(seen + db_only), db_only))
      for i in range(seen + db_only):
        self.entities.append(Entity(
            id=f"{kind}-{i:04d}", type=kind, name=self._name(kind, names, split_rng),
            split="db_only" if i in db_indices else "seen", facts={}))
    self.by_id = {e.id: e for e in self.entities}
    self._of_type: dict[tuple[str, Optional[str]], list[Entity]] = {}
    self.used_titles: set[str] = set()
    self.used_landmarks: set[str] = set()
    # Facts: independent values first, then relations in dependency order
    # (organisations need their founders' years, persons need the organisations').
    for kind, attrs in _DRAW_PHASES:
      for entity in self.of_type(kind):
        rng = self.rng(entity, "facts", attrs[0])
        for attr in attrs:
          self.set(entity, attr, self.draw(entity, attr, rng))
    for entity in self.entities:   # canonical attribute order
      entity.facts = {a: entity.facts[a] for a in ARTICLE_ORDER[entity.type]
                      if a in entity.facts}
      check_entity(entity)

  def rng(self, entity: Entity, *purpose: str) -> random.Random:
    return random.Random(":".join((str(self.seed), entity.id) + purpose))

  def _name(self, kind: str, names: _Names, rng: random.Random) -> str:
    if kind == "person":
      return f"{rng.choice(self.given_names)} {names.new((2, 3), coda=0.7)}"
    word = names.new()
    return {"river": f"{word} River", "mountain": f"Mount {word}",
            "organisation": f"{word} {rng.choice(ORG_KINDS)}"}.get(kind, word)

  def of_type(self, kind: str, split: Optional[str] = None) -> list[Entity]:
    key = (kind, split)
    if key not in self._of_type:
      self._of_type[key] = [e for e in self.entities
                            if e.type == kind and split in (None, e.split)]
    return self._of_type[key]

  @staticmethod
  def set(entity: Entity, attr: str, drawn: Optional[tuple[str, Optional[str]]]) -> None:
    if drawn is None:
      entity.facts.pop(attr, None)
      entity.links.pop(attr, None)
      return
    value, link = drawn
    entity.facts[attr] = value
    if link is not None:
      entity.links[attr] = link

  @staticmethod
  def _unique(used: set[str], make: Callable[[], str]) -> str:
    for _ in range(50):
      value = make()
      if value not in used:
        break
    used.add(value)   # past the pool size values repeat; they are then not unique
    return value

  def _pick(self, rng: random.Random, candidates: list[Entity],
            keep: Callable[[Entity], bool] = lambda e: True
            ) -> Optional[tuple[str, str]]:
    pool = [e for e in candidates if keep(e)]
    if not pool:
      return None
    target = rng.choice(pool)
    return target.name, target.id

  def draw(self, e: Entity, attr: str, rng: random.Random
           ) -> Optional[tuple[str, Optional[str]]]:
    """A value (and relation target id) for ``e.attr``; None if no valid target."""
    kind = e.type
    plain = lambda v: (v, None)  # pylint: disable=unnecessary-lambda-assignment
    seen = lambda t: self.of_type(t, "seen")  # pylint: disable=unnecessary-lambda-assignment
    if attr == "region":
      return plain(rng.choice(self.regions))
    if attr == "known_for":
      return plain(rng.choice(RIVER_FEATURES if kind == "river" else MOUNTAIN_FEATURES))
    if kind == "person":
      if attr == "occupation":
        return plain(rng.choice(OCCUPATIONS))
      if attr == "birth_year":
        return plain(str(rng.randint(1720, 1900)))
      if attr == "death_year":
        return plain(str(e.year("birth_year") + rng.randint(48, 93)))
      if attr == "notable_work":
        return plain(self._unique(self.used_titles, lambda: (
            f"The {rng.choice(WORK_ADJECTIVES)} {rng.choice(WORK_NOUNS)}")))
      if attr == "birth_city":
        return self._pick(rng, seen("city"))
      born, died = e.year("birth_year"), e.year("death_year")
      if attr == "mentor":
        return self._pick(rng, seen("person"), lambda p: p.id != e.id and (
            born - 50 <= p.year("birth_year") <= born - 15
            and p.year("death_year") >= born + 18))
      if attr == "employer":
        return self._pick(rng, seen("organisation"), lambda o: (
            o.year("founded_year") <= min(born + 40, died - 5)))
    if kind == "city":
      if attr == "founded_year":
        return plain(str(rng.randint(700, 1700)))
      if attr == "population":
        return plain(group_digits(rng.randint(20, 9000) * 100))
      if attr == "river":
        return self._pick(rng, seen("river"))
      if attr == "industry":
        return plain(rng.choice(INDUSTRIES))
      if attr == "landmark":
        return plain(self._unique(self.used_landmarks, lambda: (
            f"{rng.choice(LANDMARK_ADJECTIVES)} {rng.choice(LANDMARK_BUILDINGS)}")))
      if attr == "nickname":
        return plain(rng.choice(NICKNAMES))
      if attr == "dish":
        return plain(rng.choice(DISHES))
    if kind == "river":
      if attr == "length":
        return plain(f"{group_digits(rng.randint(40, 1900))} kilometres")
      if attr == "source":
        return self._pick(rng, seen("mountain"))
      if attr == "mouth":
        return plain(rng.choice(self.seas))
      if attr == "mapped_year":
        return plain(str(rng.randint(1550, 1880)))
      if attr == "bridges":
        return plain(str(rng.randint(3, 60)))
    if kind == "mountain":
      if attr == "range":
        return plain(rng.choice(self.ranges))
      if attr == "height":
        return plain(f"{group_digits(rng.randint(900, 6800))} metres")
      if attr == "first_ascent_by":
        return self._pick(rng, seen("person"))
      if attr == "first_ascent_year":
        climber = self.by_id[e.links["first_ascent_by"]]
        born, died = climber.year("birth_year"), climber.year("death_year")
        return plain(str(born + rng.randint(18, min(55, died - born - 1))))
      if attr == "nearest_city":
        return self._pick(rng, seen("city"))
    if kind == "organisation":
      if attr == "field":
        return plain(rng.choice(FIELDS))
      if attr == "founder":
        return self._pick(rng, seen("person"))
      if attr == "founded_year":
        founder = self.by_id[e.links["founder"]]
        born, died = founder.year("birth_year"), founder.year("death_year")
        return plain(str(born + rng.randint(25, min(60, died - born - 1))))
      if attr == "hq_city":
        return self._pick(rng, seen("city"))
      if attr == "members":
        return plain(group_digits(rng.randint(40, 5000)))
      if attr == "emblem":
        return plain(f"{rng.choice(EMBLEM_COLOURS)} {rng.choice(EMBLEM_ANIMALS)}")
      if attr == "motto":
        first, second = rng.sample(MOTTO_WORDS, 2)
        return plain(f"{first} and {second}")
    raise KeyError(f"no sampler for {kind}.{attr}")


# The order in which ``KnowledgeBase`` draws facts: a value that depends on another comes after
# it (organisations need their founders' years, persons need the organisations').
_DRAW_PHASES = (
    ("person", ("occupation", "birth_year", "death_year", "notable_work")),
    ("city", ("region", "founded_year", "population", "river", "industry", "landmark",
              "nickname", "dish")),
    ("river", ("region", "length", "source", "mouth", "known_for", "mapped_year",
               "bridges")),
    ("mountain", ("region", "range", "height", "first_ascent_by", "first_ascent_year",
                  "nearest_city", "known_for")),
    ("organisation", ("field", "founder", "founded_year", "hq_city", "members",
                      "emblem", "motto")),
    ("person", ("birth_city", "mentor", "employer")),
)


def check_entity(entity: Entity) -> None:
  """Each value is a distinct phrase: none contains another or the entity's name."""
  values = list(entity.facts.items())
  for i, (attr, value) in enumerate(values):
    for other_attr, other in values[:i]:
      if contains(value, other) or contains(other, value):
        raise ValueError(f"{entity.id}: values of {attr!r} ({value!r}) and "
                         f"{other_attr!r} ({other!r}) overlap")
    if contains(value, entity.name_word):
      raise ValueError(f"{entity.id}: value of {attr!r} ({value!r}) contains its name")



def draw_updates(kb: KnowledgeBase, fraction: float) -> dict[str, dict[str, str]]:
  """entity id -> {attribute: new value} for a seeded subset of db-only entities."""
  rng = random.Random(f"{kb.seed}:updates")
  candidates = [e for e in kb.entities if e.split == "db_only"]
  chosen = rng.sample(candidates, max(1, round(fraction * len(candidates))))
  position = {e.id: i for i, e in enumerate(kb.entities)}
  chosen.sort(key=lambda e: position[e.id])
  updates = {}
  for entity in chosen:
    attrs = [a for a in UPDATABLE[entity.type] if a in entity.facts]
    changed: dict[str, str] = {}
    trial = dataclasses.replace(entity, facts=dict(entity.facts),
                                links=dict(entity.links))
    for attr in rng.sample(attrs, min(len(attrs), rng.choice((1, 1, 2)))):
      old = entity.facts[attr]
      for _ in range(100):
        drawn = kb.draw(trial, attr, rng)
        if drawn is None or drawn[0] == old:
          continue
        if attr in ARTICLE_ATTRS and article(drawn[0]) != article(old):
          continue
        before = dict(trial.facts), dict(trial.links)
        kb.set(trial, attr, drawn)
        try:
          check_entity(trial)
        except ValueError:
          trial.facts, trial.links = before
          continue
        changed[attr] = drawn[0]
        break
    if changed:
      updates[entity.id] = changed
  return updates

