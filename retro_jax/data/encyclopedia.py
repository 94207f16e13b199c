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
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import gin

from retro_jax.utils.io import Manifest, atomic_path, atomic_write_jsonl

VERSION = 2
TYPES = ("person", "city", "river", "mountain", "organisation")
TEMPLATES = ("article", "profile", "factsheet", "note")
SPLITS = ("seen", "db_only")
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
# Entities per type at scale 1.0 (about 60% seen, 40% db-only).
BASE_COUNTS = {"person": 168, "city": 84, "river": 50, "mountain": 50, "organisation": 68}
MIN_PER_TYPE = 4
DB_ONLY_FRACTION = 0.4
MIN_WORDS, MAX_WORDS = 120, 220
_TARGET_WORDS = 124          # fillers are added until a document reaches this length

# ----------------------------------------------------------------------------------
# Value pools (no pool value may appear in any template sentence; tests check this)
# ----------------------------------------------------------------------------------

OCCUPATIONS = (
    "astronomer", "cartographer", "composer", "botanist", "engineer", "glassmaker",
    "poet", "physician", "architect", "chemist", "painter", "sculptor",
    "mathematician", "navigator", "clockmaker", "weaver", "surveyor", "geologist",
    "instrument maker", "bookbinder", "playwright", "translator", "apothecary",
    "shipwright", "illustrator", "beekeeper", "lens grinder", "organ builder",
    "philologist", "engraver")
WORK_ADJECTIVES = (
    "Quiet", "Amber", "Hollow", "Distant", "Patient", "Wintry", "Narrow", "Hidden",
    "Gilded", "Restless", "Sleeping", "Crimson", "Wandering", "Second", "Northern",
    "Last", "Measured", "Folded", "Bright", "Drowned", "Seventh", "Lesser", "Borrowed",
    "Unfinished", "Pale", "Furthest", "Burning", "Humble", "Silent", "Tidal",
    "Evening", "Faithful", "Turning", "Lost", "Gentle", "Forgotten")
WORK_NOUNS = (
    "Orrery", "Harbour", "Lantern", "Meridian", "Compass", "Atlas", "Chorus",
    "Ledger", "Tide", "Clockwork", "Archive", "Almanac", "Orchard", "Lens",
    "Canticle", "Prism", "Sextant", "Tapestry", "Fugue", "Herbarium", "Threshold",
    "Beacon", "Loom", "Estuary", "Psalter", "Chronicle", "Spindle", "Kiln",
    "Astrolabe", "Pendulum", "Sonata", "Mosaic", "Register", "Furnace", "Horizon",
    "Garden")
LANDMARK_ADJECTIVES = (
    "Copper", "Marble", "Blue", "Weeping", "Red", "White", "Green", "High", "Sunken",
    "Crooked", "Golden", "Grey", "Painted", "Long", "Stone", "Black", "Twin",
    "Windy", "Old", "Broad")
LANDMARK_BUILDINGS = (
    "Gate", "Tower", "Bridge", "Market", "Cathedral", "Library", "Fountain", "Arcade",
    "Lighthouse", "Citadel", "Granary", "Theatre", "Bathhouse", "Mill", "Palace",
    "Clocktower", "Aqueduct", "Stair", "Cloister", "Belfry")
NICKNAMES = (
    "City of Bells", "City of Kites", "City of Chimneys", "City of Canals",
    "City of Spires", "City of Ferries", "City of Lamps", "City of Barrels",
    "City of Anchors", "City of Steps", "City of Arches", "City of Whistles",
    "City of Violets", "City of Ropes", "City of Scales", "City of Roses",
    "City of Masts", "City of Dovecotes", "City of Sundials", "City of Wells",
    "City of Banners", "City of Cranes", "City of Orchards", "City of Echoes",
    "Salt City", "Iron City", "Lantern City", "Brick City", "Amber City",
    "Windmill City", "Harbour City", "Silk City", "Violet City", "Owl City")
INDUSTRIES = (
    "shipbuilding", "wool weaving", "salt mining", "glassblowing", "paper making",
    "clockmaking", "printing", "tanning", "silk dyeing", "brewing", "pottery",
    "copper smelting", "lacemaking", "boatbuilding", "cheese making", "rope making",
    "bell founding", "olive pressing", "the timber trade", "the wine trade",
    "the spice trade", "horse breeding", "marble quarrying", "tea blending")
FIELDS = (
    "astronomy", "cartography", "medicine", "botany", "navigation", "mathematics",
    "architecture", "chemistry", "linguistics", "geology", "poetry", "engineering",
    "horology", "optics", "meteorology", "zoology", "philosophy", "agriculture",
    "theology", "music theory")
EMBLEM_COLOURS = ("silver", "golden", "scarlet", "black", "white", "green", "blue",
                  "grey", "amber", "violet", "crimson", "orange")
EMBLEM_ANIMALS = ("heron", "fox", "stag", "owl", "hare", "raven", "lynx", "otter",
                  "swan", "boar", "falcon", "badger", "crane", "wolf", "bear", "moth",
                  "beetle", "kingfisher", "lark", "eagle")
RIVER_FEATURES = (
    "black sand banks", "winter floods", "floating markets", "white cliffs",
    "stone weirs", "eel fisheries", "wooded islands", "roaring rapids",
    "willow groves", "painted barges", "tidal bores", "oyster beds", "reed marshes",
    "old ferry crossings", "otter colonies", "amber pebbles")
MOUNTAIN_FEATURES = (
    "hot springs", "blue glaciers", "wild goats", "crystal caves", "pilgrim paths",
    "alpine meadows", "frozen waterfalls", "hermit chapels", "old copper mines",
    "eagle nests", "twin summits", "red granite cliffs", "cloud forests",
    "snow bridges", "ancient cairns", "edelweiss slopes")
DISHES = (
    "smoked eel pie", "barley soup", "honey cakes", "salted herring",
    "plum dumplings", "saffron rice", "walnut bread", "lamb stew", "cabbage rolls",
    "spiced sausages", "almond biscuits", "onion tart", "chestnut porridge",
    "pickled mushrooms", "cherry pudding", "goat cheese pastries", "lentil broth",
    "apple fritters", "pepper crab", "buttered leeks")
MOTTO_WORDS = ("Patience", "Measure", "Light", "Courage", "Order", "Candour",
               "Diligence", "Memory", "Wonder", "Care", "Precision", "Thrift", "Honour",
               "Silence", "Craft", "Truth")
ORG_KINDS = ("Society", "Institute", "Guild", "Academy", "Circle", "Fellowship",
             "League", "Foundation", "College", "Union")

# Syllables for names: consonant onset + vowel (+ an optional final coda).
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th",
           "dr", "kr", "tr", "br", "gl", "vr", "sk", "h", "y")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "th", "sk", "nd", "v", "sh", "rn", "x")
# A best-effort guard against real names and words the syllables can form.
_BLOCKED = frozenset(
    "Adam Alan Anna Bella Bora Boris Dana Dara Davos Delta Dora Dubai Elena Erin "
    "Fiona Gala Garda Gena Gora Hana Hilo Kara Karen Kenya Kira Kobe Koda Lana Lara "
    "Lena Lima Linda Lisa Loma Luna Maya Mena Mila Mina Mona Nadia Nara Nina Noma "
    "Nora Rama Reno Rita Roma Rosa Sara Sela Sofia Sona Tara Tina Toga Tokyo Vera "
    "Verona Yoga Yuma Zara Zeta Tamara Samara Kirov Davor Milan Goran Sudan Boston "
    "Dakota Salem Teheran Kerala Sedona Ravenna Modena Lorena Serena Selena Rosario "
    "Gotham Baron Banner Tundra Sonar Radar Tenor Lemur Rumor Humor Vigor Bravo "
    "Gumbo Mango Tango Turbo Nylon Salon Talon Melon Demon Lemon Venom Kebab".split())


def _article(value: str) -> str:
  return "an" if value[:1].lower() in "aeiou" else "a"


def _group(number: int) -> str:
  return f"{number:,}"


def _title_case(word: str) -> str:
  return word[:1].upper() + word[1:]


def contains(text: str, value: str) -> bool:
  """Whether ``value`` occurs in ``text`` as a whole phrase (case-sensitive).

  Phrase edges must not touch a word character, and a number must not continue
  into a longer one ("412" is not in "3,412"; "1,240" is not in "11,240").
  """
  if value not in text:
    return False
  pattern = r"(?<![\w])(?<!\d[,.])" + re.escape(value) + r"(?![\w])(?![,.]\d)"
  return re.search(pattern, text) is not None


# ----------------------------------------------------------------------------------
# Templates. Placeholders: {n}/{N} the entity's name as used in prose (lower/upper
# case first letter, e.g. "the Orvessa Guild"), {s}/{S} its short form (a person's
# surname), and one placeholder per attribute ({occupation_a}/{emblem_a} add a/an).
# Prose phrasings: indices 0-1 are the article's, 2-3 the profile's, 4-5 the note's.
# ----------------------------------------------------------------------------------

PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "occupation": (
            "{n} was {occupation_a} whose work is described in several entries of "
            "this encyclopedia.",
            "By profession {n} was {occupation_a}, and {s} followed that calling for "
            "most of a working life.",
            "{S} trained as {occupation_a} and never seriously considered another "
            "calling.",
            "Those who knew {s} remembered {occupation_a} of great patience and "
            "precise habits.",
            "Readers may know {n} first of all as {occupation_a}.",
            "Our readers asked why {n}, {occupation_a} by trade, deserves a column of "
            "its own."),
        "birth_year": (
            "{n} was born in the year {birth_year}.",
            "The records give {birth_year} as the year in which {n} was born.",
            "{S} came into the world in {birth_year}, a date that {s} liked to "
            "mention in letters.",
            "The story of {s} begins in {birth_year}, the year of the birth of {n}.",
            "Archive papers confirm that {n} was born in {birth_year}.",
            "It has been a long time since {birth_year}, when {n} was born."),
        "birth_city": (
            "The birthplace of {n} was the city of {birth_city}.",
            "{n} was a native of {birth_city} and spent a childhood in its streets.",
            "{S} grew up in {birth_city}, the city where {s} had been born.",
            "The family of {s} lived in {birth_city}, and it was there that {s} was "
            "born.",
            "Visitors to {birth_city} can still find the house where {n} was born.",
            "{n} was born in {birth_city}, a fact that the city proudly advertises."),
        "mentor": (
            "As a student, {n} was taught by {mentor}.",
            "{n} trained under the guidance of {mentor}, who remained a lifelong "
            "influence.",
            "The teacher who shaped {s} most was {mentor}.",
            "Early on, {s} became the pupil of {mentor} and learned the craft at close "
            "quarters.",
            "{n} once said that everything began with lessons from {mentor}.",
            "Few remember that {n} studied under {mentor} as a young apprentice."),
        "employer": (
            "{n} was a member of the {employer} for many years.",
            "For much of a career, {n} belonged to the {employer}.",
            "{S} joined the {employer} and stayed loyal to it for decades.",
            "Membership of the {employer} gave {s} colleagues, a salary and a "
            "library.",
            "The {employer} still counts {n} among its most famous members.",
            "{n} belonged to the {employer}, which has recently opened its archives."),
        "notable_work": (
            "The best-known work of {n} is {notable_work}.",
            "{n} is chiefly remembered for the work titled {notable_work}.",
            "Of everything {s} produced, {notable_work} is the work most often cited.",
            "{S} considered {notable_work} the finest achievement of a busy career.",
            "A new edition of {notable_work}, the best-known work of {n}, is now "
            "available.",
            "{n} remains famous above all for {notable_work}."),
        "death_year": (
            "{n} died in {death_year}.",
            "The life of {n} ended in the year {death_year}.",
            "{S} died in {death_year}, mourned by friends and former students.",
            "The story of {s} closes in {death_year}, the year of the death of {n}.",
            "{n} died in {death_year}, and the anniversary is marked every year.",
            "Since the death of {n} in {death_year}, interest has only grown."),
    },
    "city": {
        "region": (
            "The province of {region} counts {n} among its cities.",
            "{n} lies in {region}, one of the provinces described in this "
            "encyclopedia.",
            "{n} belongs to the province of {region}, and its people are proud of it.",
            "The people of {n} call their province, {region}, the finest in the land.",
            "Travellers will find {n} in the province of {region}.",
            "The road to {n} crosses much of the province of {region}."),
        "founded_year": (
            "{n} was founded in {founded_year}.",
            "The city of {n} dates its founding to the year {founded_year}.",
            "According to its charter, {n} was founded in {founded_year}.",
            "Settlers founded {n} in {founded_year} on a patch of dry ground.",
            "{n} has stood since its founding in {founded_year}.",
            "Guides like to remind visitors that {n} was founded in {founded_year}."),
        "population": (
            "{n} has a population of about {population}.",
            "The last census counted {population} inhabitants in {n}.",
            "Today {n} is home to about {population} people.",
            "The population of {n} has grown to {population}.",
            "With about {population} residents, {n} is busy but rarely crowded.",
            "Some {population} people live in {n} today."),
        "river": (
            "{n} stands on the banks of the {river}.",
            "The {river} flows through the centre of {n}.",
            "{n} grew up along the {river}, which still carries boats past its walls.",
            "Life in {n} has always followed the seasons of the {river}.",
            "A walk along the {river} is the best introduction to {n}.",
            "Boats on the {river} stop at {n} several times a day."),
        "industry": (
            "The economy of {n} is known above all for {industry}.",
            "{n} is famous for {industry}.",
            "For generations the families of {n} have lived from {industry}.",
            "{n} made its fortune from {industry}, and still does.",
            "Ask anyone in {n} about {industry} and you will hear a long story.",
            "Many workshops in {n} are devoted to {industry}."),
        "landmark": (
            "The best-known landmark of {n} is the {landmark}.",
            "The {landmark} is the most famous building in {n}.",
            "Every child in {n} knows the {landmark}, the pride of the city.",
            "Citizens of {n} meet at the {landmark} on feast days.",
            "Do not leave {n} without seeing the {landmark}.",
            "The {landmark} in {n} is open to visitors most mornings."),
        "nickname": (
            "{n} is often called the {nickname}.",
            "{n} is known across the province as the {nickname}.",
            "Locals proudly call {n} the {nickname}.",
            "It is easy to see why {n} is nicknamed the {nickname}.",
            "Guidebooks call {n} the {nickname}, and the name fits.",
            "Welcome to {n}, the {nickname}."),
        "dish": (
            "The local dish of {n} is {dish}, served in every inn.",
            "No visit to {n} is complete without {dish}, the local speciality.",
            "The kitchens of {n} are proud of {dish}, the dish the city is known for.",
            "Every family in {n} has its own recipe for {dish}.",
            "Try the {dish} in any tavern of {n}; it is the local speciality.",
            "Food lovers come to {n} for its {dish}."),
    },
    "river": {
        "region": (
            "The whole course of {n} lies in the province of {region}.",
            "{N} runs through the province of {region}.",
            "Most of the course of {s} lies within the province of {region}.",
            "{S} is one of the rivers of the province of {region}.",
            "Anglers travel to {region} to fish in {n}.",
            "The province of {region} is crossed by {n}."),
        "length": (
            "{N} is {length} long.",
            "The total length of {n} is {length}.",
            "From source to mouth, {s} measures {length}.",
            "{S} travels {length} before it reaches the sea.",
            "A boat trip along all {length} of {n} takes several weeks.",
            "{N} stretches for {length}."),
        "source": (
            "{N} rises on the slopes of {source}.",
            "The source of {n} is on {source}.",
            "{S} begins as a spring high on {source}.",
            "Snowmelt from {source} feeds the first waters of {s}.",
            "Hikers can visit the source of {n} on {source}.",
            "{N} starts its journey on {source}."),
        "mouth": (
            "{N} flows into the {mouth}.",
            "The mouth of {n} opens onto the {mouth}.",
            "{S} ends its course in the {mouth}.",
            "At last {s} empties into the {mouth}.",
            "Where {n} meets the {mouth}, a wide delta has formed.",
            "Ferries cross the mouth of {n} where it enters the {mouth}."),
        "known_for": (
            "{N} is known for its {known_for}.",
            "{N} is famous for its {known_for}.",
            "{S} owes its fame to its {known_for}.",
            "Painters have long been drawn to {s} by its {known_for}.",
            "Do not miss the {known_for} of {n}.",
            "Locals insist that the {known_for} of {n} are unique."),
        "mapped_year": (
            "{N} was first mapped in {mapped_year}.",
            "The first survey of {n} was made in {mapped_year}.",
            "Surveyors charted {s} for the first time in {mapped_year}.",
            "No map showed {s} accurately until {mapped_year}.",
            "Old maps of {n} go back to {mapped_year}, when it was first surveyed.",
            "Since the first survey of {n} in {mapped_year}, its banks have changed "
            "little."),
        "bridges": (
            "{N} is crossed by {bridges} bridges along its course.",
            "Along its course, {n} is spanned by {bridges} bridges.",
            "Over the centuries people have built {bridges} bridges across {s}.",
            "{S} is crossed by {bridges} bridges, some of them very old.",
            "Count the bridges as you travel: {n} has {bridges} of them.",
            "Walkers can cross {n} on any of its {bridges} bridges."),
    },
    "mountain": {
        "region": (
            "{n} is a mountain in the province of {region}.",
            "{n} rises in the province of {region}.",
            "{S} towers over the province of {region}.",
            "Shepherds of {region} have grazed their flocks below {s} for centuries.",
            "Travellers reach {n} through the province of {region}.",
            "Hikers in {region} often choose {n} as their goal."),
        "range": (
            "{n} belongs to the {range}.",
            "{n} is one of the peaks of the {range}.",
            "{S} is part of the {range}, a chain of high summits.",
            "Among the summits of the {range}, {s} is easy to recognise.",
            "Seen from the valleys of the {range}, the peak of {n} stands out.",
            "{n} is the peak of the {range} that most visitors come to see."),
        "height": (
            "{n} reaches a height of {height}.",
            "The summit of {n} stands {height} above sea level.",
            "{S} rises to {height}.",
            "At {height}, the top of {s} is often in cloud.",
            "Climbers who reach the summit of {n} stand {height} above the sea.",
            "{n} is {height} high."),
        "first_ascent_year": (
            "The first recorded ascent of {n} took place in {first_ascent_year}.",
            "{n} was first climbed in {first_ascent_year}.",
            "Nobody stood on the summit of {s} until {first_ascent_year}.",
            "The year {first_ascent_year} saw the first ascent of {s}.",
            "It is now long since {first_ascent_year}, when {n} was first climbed.",
            "The first ascent of {n}, in {first_ascent_year}, is still celebrated "
            "locally."),
        "first_ascent_by": (
            "The first climber to reach the top of {n} was {first_ascent_by}.",
            "{n} was first climbed by {first_ascent_by}.",
            "The honour of the first ascent of {s} belongs to {first_ascent_by}.",
            "Long before the tourists, {first_ascent_by} was the first to stand on "
            "top of {s}.",
            "A plaque on {n} honours {first_ascent_by}, its first climber.",
            "Guides on {n} still tell how {first_ascent_by} first reached the "
            "summit."),
        "nearest_city": (
            "The nearest city to {n} is {nearest_city}.",
            "{n} can be seen from the city of {nearest_city}, the nearest town.",
            "Most expeditions to {s} set out from {nearest_city}, the closest city.",
            "On clear days the people of {nearest_city}, the nearest city, can see "
            "{s}.",
            "The easiest approach to {n} starts in {nearest_city}, the nearest city.",
            "Buses from {nearest_city} bring walkers to the foot of {n}."),
        "known_for": (
            "{n} is known for its {known_for}.",
            "{n} is famous for its {known_for}.",
            "{S} owes much of its fame to its {known_for}.",
            "Scientists have studied the {known_for} of {s} for many years.",
            "The {known_for} of {n} attract visitors all year.",
            "Do not miss the {known_for} of {n}."),
    },
    "organisation": {
        "field": (
            "The work of {n} is centred on {field}.",
            "{N} was created to advance the study of {field}.",
            "Its members joined {n} out of a shared passion for {field}.",
            "{N} has always put {field} at the centre of its work.",
            "{N}, which promotes {field}, has announced a new season of lectures.",
            "Anyone interested in {field} will know the name of {n}."),
        "founded_year": (
            "{N} was founded in {founded_year}.",
            "The year {founded_year} saw the founding of {n}.",
            "{N} held its first meeting in {founded_year}.",
            "Since {founded_year}, when it was founded, {n} has met without "
            "interruption.",
            "{N} celebrates its founding in {founded_year} each year.",
            "Records show that {n} was established in {founded_year}."),
        "founder": (
            "{N} was founded by {founder}.",
            "The founder of {n} was {founder}.",
            "It was {founder} who gathered the first members of {n}.",
            "{N} owes its existence to {founder}, its founder.",
            "A portrait of {founder}, the founder of {n}, hangs in its hall.",
            "Members of {n} still honour {founder} as its founder."),
        "hq_city": (
            "{N} has its headquarters in {hq_city}.",
            "The seat of {n} is in the city of {hq_city}.",
            "{N} meets in its hall in {hq_city}, where it has its headquarters.",
            "The headquarters of {n} have always been in {hq_city}.",
            "Visitors to {hq_city} can tour the headquarters of {n}.",
            "{N}, based in {hq_city}, welcomes new members."),
        "members": (
            "{N} has about {members} members.",
            "The membership of {n} numbers some {members}.",
            "Today {n} counts {members} members.",
            "With {members} members, {n} is larger than ever.",
            "Some {members} members belong to {n} at present.",
            "{N} reports a membership of {members}."),
        "emblem": (
            "The emblem of {n} is {emblem_a}.",
            "{N} uses {emblem_a} as its emblem.",
            "The members of {n} wear badges showing {emblem_a}, the emblem they "
            "share.",
            "{N} chose {emblem_a} as its emblem.",
            "Look for {emblem_a}, the emblem of {n}, above the door.",
            "The flag of {n} shows {emblem_a}, its emblem."),
        "motto": (
            "The motto of {n} is \"{motto}\".",
            "{N} has taken \"{motto}\" as its motto.",
            "From its first year, {n} has lived by the motto \"{motto}\".",
            "The words \"{motto}\" have served {n} as a motto since its early days.",
            "The motto \"{motto}\" was printed on every invitation sent by {n}.",
            "{N} reminded its members of its motto, \"{motto}\"."),
    },
}
STYLE_VARIANTS = {"article": (0, 1), "profile": (2, 3), "note": (4, 5)}

# Fact sheet lines: a frame around (label, value as written in the sheet).
FACTSHEET_FRAMES = (
    "The {label} of {n} is {value}.",
    "Entry for {n}, {label}: {value}.",
    "Under {label}, the record for {n} lists {value}.",
    "As for the {label} of {n}, it is {value}.",
)
FACTSHEET: dict[str, dict[str, tuple[str, str]]] = {
    "person": {
        "occupation": ("occupation", "{occupation}"),
        "birth_year": ("year of birth", "{birth_year}"),
        "birth_city": ("place of birth", "{birth_city}"),
        "mentor": ("teacher", "{mentor}"),
        "employer": ("affiliation", "the {employer}"),
        "notable_work": ("best-known work", "{notable_work}"),
        "death_year": ("year of death", "{death_year}"),
    },
    "city": {
        "region": ("province", "{region}"),
        "founded_year": ("year of founding", "{founded_year}"),
        "population": ("population", "{population}"),
        "river": ("river", "the {river}"),
        "industry": ("main industry", "{industry}"),
        "landmark": ("best-known landmark", "the {landmark}"),
        "nickname": ("nickname", "the {nickname}"),
        "dish": ("local dish", "{dish}"),
    },
    "river": {
        "region": ("province", "{region}"),
        "length": ("length", "{length}"),
        "source": ("source", "{source}"),
        "mouth": ("mouth", "the {mouth}"),
        "known_for": ("best-known feature", "its {known_for}"),
        "mapped_year": ("year first mapped", "{mapped_year}"),
        "bridges": ("number of bridges", "{bridges}"),
    },
    "mountain": {
        "region": ("province", "{region}"),
        "range": ("mountain range", "the {range}"),
        "height": ("height", "{height}"),
        "first_ascent_year": ("year of first ascent", "{first_ascent_year}"),
        "first_ascent_by": ("first climber", "{first_ascent_by}"),
        "nearest_city": ("nearest city", "{nearest_city}"),
        "known_for": ("best-known feature", "its {known_for}"),
    },
    "organisation": {
        "field": ("field", "{field}"),
        "founded_year": ("year of founding", "{founded_year}"),
        "founder": ("founder", "{founder}"),
        "hq_city": ("headquarters", "{hq_city}"),
        "members": ("number of members", "{members}"),
        "emblem": ("emblem", "{emblem_a}"),
        "motto": ("motto", "\"{motto}\""),
    },
}
# Attribute order of each style (the note shuffles; the fact sheet sorts by label).
ARTICLE_ORDER = {t: tuple(PHRASES[t]) for t in TYPES}
PROFILE_ORDER = {
    "person": ("birth_year", "birth_city", "mentor", "occupation", "employer",
               "notable_work", "death_year"),
    "city": ("founded_year", "river", "region", "industry", "dish", "nickname",
             "landmark", "population"),
    "river": ("source", "region", "known_for", "length", "bridges", "mouth",
              "mapped_year"),
    "mountain": ("range", "region", "nearest_city", "height", "known_for",
                 "first_ascent_year", "first_ascent_by"),
    "organisation": ("founded_year", "founder", "hq_city", "field", "motto", "emblem",
                     "members"),
}
# The article opens like an encyclopedia entry: a lead sentence with key facts.
LEADS = {
    "person": ("{N}, born in {birth_city} in {birth_year}, was {occupation_a} who died "
               "in {death_year}.",
               "{N} was {occupation_a} from {birth_city}, who lived from {birth_year} "
               "to {death_year}."),
    "city": ("{N} is a city of {region} that stands on the {river}.",
             "{N} is a city on the {river}, in the province of {region}."),
    "river": ("{N} is a river of {region} that flows into the {mouth}.",
              "{N} is a river of {region} that rises on {source}."),
    "mountain": ("{N} is a mountain of the {range}, {height} high.",
                 "{N} is a peak of {height} in the province of {region}."),
    "organisation": ("{N} is an organisation devoted to {field}, founded in "
                     "{founded_year}.",
                     "{N} is an organisation based in {hq_city} and devoted to "
                     "{field}."),
}


def _frames(kind: str) -> dict[str, tuple[tuple[str, str], tuple[str, str]]]:
  """(intros, closings) per style for one kind of entity (`kind` as it reads in prose)."""
  return {
      "article": (
          (f"{{N}} is {kind} described in this encyclopedia; this entry collects its "
           "principal facts.",
           "This article gives an overview of what is known about {n}."),
          ("Further details about {n} can be found in the related entries of this "
           "encyclopedia.",
           "The entries on the places and people connected with {n} give more "
           "background.")),
      "profile": (
          ("A short portrait of {n} follows, told in the order in which its story is "
           "usually recounted.",
           f"Every {kind.split()[-1]} has a character, and {{n}} has more than most."),
          ("That, in brief, is the story of {n}.",
           "So ends this short portrait of {n}.")),
      "factsheet": (
          ("Fact sheet for {n}, compiled from the standard reference entries.",
           "The following fact sheet lists the key data about {n}, one item per "
           "line."),
          ("End of the fact sheet for {n}.",
           "This completes the list of key data for {n}.")),
  }


FRAMES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "person": {
        **_frames("a person"),
        "article": (
            ("{N} is the subject of this encyclopedia entry, which brings together the "
             "main facts of a well-documented life.",
             "This entry summarises what is known about {n}, drawing on the standard "
             "reference works."),
            ("Further details about {n} can be found in the related entries of this "
             "encyclopedia.",
             "The entries on the places and societies connected with {n} give more "
             "background.")),
        "profile": (
            ("A short profile of {n} follows, told in the order in which the events of "
             "the life are usually recounted.",
             "Few lives are as easy to sketch in a few lines as that of {n}."),
            ("That, in brief, is the story of {n}.",
             "So ends this short portrait of {n}.")),
        "note": (
            ("This week our column on remarkable lives turns to {n}.",
             "Notes from the reading room: a reader has asked us about {n}."),
            ("Readers with more to say about {n} are invited to write to the editors.",
             "More about {n} may follow in a later column.")),
    },
    "city": {
        **_frames("a city"),
        "note": (
            ("Travel notes: a first visit to the city of {n}.",
             "Our travel guide this month takes you to {n}."),
            ("Allow at least two days to enjoy {n} properly.",
             "Whatever the season, {n} rewards a visit.")),
    },
    "river": {
        **_frames("a river"),
        "note": (
            ("Travel notes: a journey along {n}.",
             "Our travel guide this month follows {n} downstream."),
            ("Pack waterproof boots for any trip along {n}.",
             "Whatever the season, {n} rewards a visit.")),
    },
    "mountain": {
        **_frames("a mountain"),
        "note": (
            ("Travel notes: a walking trip to {n}.",
             "Our travel guide this month climbs {n}."),
            ("Bring warm clothes for any trip to {n}.",
             "Whatever the season, {n} rewards a visit.")),
    },
    "organisation": {
        **_frames("an organisation"),
        "note": (
            ("News in brief: {n} has been in the news again this month.",
             "Our correspondent reports on {n}."),
            ("{N} says that more announcements will follow.",
             "Further news from {n} is expected soon.")),
    },
}
# Name-bearing sentences without facts, added until a document is long enough.
FILLERS = {
    "person": (
        "Letters written by {n} survive in several private collections.",
        "Historians still discuss the character of {n} with some affection.",
        "A small portrait of {n} hangs in a reading room open to the public.",
        "Little is recorded about the daily habits of {n}, but much about the work.",
        "Students are often asked to write essays about {n}.",
        "The name of {n} appears in many catalogues and indexes.",
        "Anecdotes about {n} were collected by friends and printed after a long "
        "delay.",
        "Several streets have been named in honour of {n}."),
    "city": (
        "The markets of {n} are busy from early morning.",
        "Old photographs of {n} show narrow lanes and crowded quays.",
        "Many writers have described the evening light over {n}.",
        "The streets of {n} are paved with worn grey stone.",
        "Festivals in {n} fill the squares with crowds and stalls.",
        "The old quarter of {n} is best explored on foot.",
        "Visitors often remark on the friendliness of the people of {n}.",
        "The archives of {n} hold records going back many generations."),
    "river": (
        "The water of {n} is cold even in summer.",
        "Fishermen on {n} tell stories about its moods.",
        "Old bridges cross {n} at several points.",
        "In spring {n} runs high and fast.",
        "Poets of the region have written many verses about {n}.",
        "The banks of {n} are lined with alders and tall grass.",
        "Mills once stood along {n}, though few remain.",
        "Boatmen know every bend of {n}."),
    "mountain": (
        "Snow lingers on the upper slopes of {n} until early summer.",
        "Weather on {n} changes quickly.",
        "Paths on {n} are marked with painted stones.",
        "The view from {n} is said to reach far across the plain.",
        "Shepherds' huts are scattered over the lower slopes of {n}.",
        "Many climbers remember their first sight of {n}.",
        "Storms gather around the summit of {n} on summer afternoons.",
        "The forests below {n} are full of birds."),
    "organisation": (
        "The library of {n} is open to scholars by appointment.",
        "Meetings of {n} are known for long and lively debates.",
        "The annual dinner of {n} is a popular event.",
        "Minutes of the meetings of {n} have been kept since the beginning.",
        "A small museum run by {n} displays its collections.",
        "{N} publishes a yearly report on its activities.",
        "Young people are encouraged to join {n}.",
        "Lectures organised by {n} are open to all."),
}
# Sentences that repeat one of the entity's facts in passing (no new facts).
ECHOES = {
    "person": (
        "In {birth_city}, the name of {n} is still well known.",
        "Copies of {notable_work} by {n} are kept in many libraries.",
        "The {employer} keeps a small room in memory of {n}.",
        "As {occupation_a}, {n} was respected by colleagues.",
        "Among the pupils of {mentor}, {n} is the one most often mentioned."),
    "city": (
        "From the bridges of {n} one can watch the {river} flow past.",
        "Photographs of the {landmark} have made {n} known far away.",
        "Visitors to {n} often take home a recipe for {dish}.",
        "The workshops of {n} have kept {industry} alive for centuries."),
    "river": (
        "Climbers on {source} can see the first streams of {n}.",
        "Ships from the {mouth} sometimes sail up {n}.",
        "Photographs of the {known_for} of {n} appear in many books.",
        "{N} is a familiar sight to the people of {region}."),
    "mountain": (
        "From the squares of {nearest_city}, {n} is a familiar sight.",
        "Maps of the {range} show {n} clearly.",
        "Photographs of the {known_for} of {n} appear in many books.",
        "The boots worn by {first_ascent_by} on {n} are kept in a museum."),
    "organisation": (
        "The building of {n} is a familiar sight in {hq_city}.",
        "Letters from {n} are sealed with {emblem_a}.",
        "Lectures at {n} often end with its motto, \"{motto}\".",
        "Scholars of {field} often visit the library of {n}."),
}
QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "occupation": ("What was the occupation of {n}?", "What did {n} do for a living?",
                       "What profession did {n} follow?"),
        "birth_year": ("In what year was {n} born?", "When was {n} born?",
                       "What is the year of birth of {n}?"),
        "birth_city": ("In which city was {n} born?", "Where was {n} born?",
                       "What is the birthplace of {n}?"),
        "mentor": ("Who was the teacher of {n}?", "Under whom did {n} study?",
                   "Who taught {n}?"),
        "employer": ("Which organisation was {n} a member of?",
                     "To which body did {n} belong?",
                     "Which institution did {n} belong to?"),
        "notable_work": ("What is the best-known work of {n}?",
                         "For which work is {n} best remembered?",
                         "What is the title of the most famous work of {n}?"),
        "death_year": ("In what year did {n} die?", "When did {n} die?",
                       "What is the year of death of {n}?"),
    },
    "city": {
        "region": ("In which province is {n}?", "Which province does {n} lie in?",
                   "In what province is the city of {n} located?"),
        "founded_year": ("When was {n} founded?", "In what year was {n} founded?",
                         "What is the founding year of {n}?"),
        "population": ("What is the population of {n}?", "How many people live in {n}?",
                       "How many inhabitants does {n} have?"),
        "river": ("On which river does {n} stand?", "Which river flows through {n}?",
                  "What river is {n} built on?"),
        "industry": ("What industry is {n} known for?", "What is the main industry of {n}?",
                     "For which trade is {n} famous?"),
        "landmark": ("What is the best-known landmark of {n}?",
                     "Which building is the most famous landmark of {n}?",
                     "What landmark is {n} famous for?"),
        "nickname": ("What is the nickname of {n}?", "What is {n} often called?",
                     "By what nickname is {n} known?"),
        "dish": ("What is the local dish of {n}?", "Which dish is {n} known for?",
                 "What speciality should visitors eat in {n}?"),
    },
    "river": {
        "region": ("Through which province does {n} flow?", "In which province is {n}?",
                   "Which province does {n} run through?"),
        "length": ("How long is {n}?", "What is the length of {n}?",
                   "How many kilometres long is {n}?"),
        "source": ("On which mountain does {n} rise?", "Where is the source of {n}?",
                   "Which mountain is the source of {n}?"),
        "mouth": ("Into which sea does {n} flow?", "Where does {n} end?",
                  "What sea is at the mouth of {n}?"),
        "known_for": ("What is {n} known for?", "What is {n} famous for?",
                      "For what is {n} best known?"),
        "mapped_year": ("When was {n} first mapped?", "In what year was {n} first surveyed?",
                        "What year was {n} first charted?"),
        "bridges": ("How many bridges cross {n}?", "How many bridges span {n}?",
                    "What is the number of bridges over {n}?"),
    },
    "mountain": {
        "region": ("In which province is {n}?", "Which province is {n} in?",
                   "In what province does {n} rise?"),
        "range": ("To which mountain range does {n} belong?", "Which range is {n} part of?",
                  "What range includes {n}?"),
        "height": ("How high is {n}?", "What is the height of {n}?", "How tall is {n}?"),
        "first_ascent_year": ("When was {n} first climbed?",
                              "In what year was the first ascent of {n}?",
                              "What year did someone first reach the summit of {n}?"),
        "first_ascent_by": ("Who first climbed {n}?", "Who made the first ascent of {n}?",
                            "Who was the first person to reach the top of {n}?"),
        "nearest_city": ("What is the nearest city to {n}?", "Which city is closest to {n}?",
                         "From which city do most expeditions to {n} start?"),
        "known_for": ("What is {n} known for?", "What is {n} famous for?",
                      "For what is {n} best known?"),
    },
    "organisation": {
        "field": ("What field is {n} devoted to?", "What does {n} study?",
                  "Which subject does {n} promote?"),
        "founded_year": ("When was {n} founded?", "In what year was {n} founded?",
                         "What is the founding year of {n}?"),
        "founder": ("Who founded {n}?", "Who was the founder of {n}?",
                    "Who established {n}?"),
        "hq_city": ("Where is {n} based?", "In which city are the headquarters of {n}?",
                    "Which city is home to {n}?"),
        "members": ("How many members does {n} have?", "What is the membership of {n}?",
                    "How large is the membership of {n}?"),
        "emblem": ("What is the emblem of {n}?", "What does the emblem of {n} show?",
                   "Which emblem does {n} use?"),
        "motto": ("What is the motto of {n}?", "Which motto does {n} use?",
                  "What words serve as the motto of {n}?"),
    },
}
# Attributes a knowledge update may change (no year constraints hang on them).
UPDATABLE = {
    "person": ("birth_city", "occupation", "notable_work", "employer"),
    "city": ("region", "population", "river", "industry", "landmark", "nickname",
             "dish"),
    "river": ("region", "length", "source", "mouth", "known_for", "bridges"),
    "mountain": ("region", "range", "height", "nearest_city", "known_for"),
    "organisation": ("field", "hq_city", "members", "emblem", "motto"),
}
# Attributes rendered with a/an: an update keeps the article.
_ARTICLE_ATTRS = ("occupation", "emblem")


# ----------------------------------------------------------------------------------
# The knowledge base
# ----------------------------------------------------------------------------------


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
    return {"n": n, "N": _title_case(n), "s": s, "S": _title_case(s)}

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
      word = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)
                     for _ in range(count))
      if self.rng.random() < coda:
        word += self.rng.choice(_CODAS)
      word = _title_case(word)
      if (4 <= len(word) <= 11 and word not in self.used and word not in _BLOCKED
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


class _KB:
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
        return plain(_group(rng.randint(20, 9000) * 100))
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
        return plain(f"{_group(rng.randint(40, 1900))} kilometres")
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
        return plain(f"{_group(rng.randint(900, 6800))} metres")
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
        return plain(_group(rng.randint(40, 5000)))
      if attr == "emblem":
        return plain(f"{rng.choice(EMBLEM_COLOURS)} {rng.choice(EMBLEM_ANIMALS)}")
      if attr == "motto":
        first, second = rng.sample(MOTTO_WORDS, 2)
        return plain(f"{first} and {second}")
    raise KeyError(f"no sampler for {kind}.{attr}")


# The order in which ``_KB`` draws facts: a value that depends on another comes after
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


# ----------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------


def _fill_values(entity: Entity, facts: Mapping[str, str]) -> dict[str, str]:
  values = dict(entity.refs())
  values.update(facts)
  for attr in _ARTICLE_ATTRS:
    if attr in facts:
      values[f"{attr}_a"] = f"{_article(facts[attr])} {facts[attr]}"
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
  return _title_case(sentence)


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


def _doc(entity: Entity, template: str, text: str) -> dict[str, str]:
  return {"id": f"{entity.id}:{template}", "title": entity.name, "entity": entity.id,
          "type": entity.type, "template": template, "split": entity.split,
          "text": text}


def _question(entity: Entity, attr: str, rng: random.Random) -> str:
  return rng.choice(QUESTIONS[entity.type][attr]).format_map(entity.refs())


def _qa(entity: Entity, seed: int, per_fact: int) -> list[dict[str, Any]]:
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


def _updates(kb: _KB, fraction: float) -> dict[str, dict[str, str]]:
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
        if attr in _ARTICLE_ATTRS and _article(drawn[0]) != _article(old):
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


# ----------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------


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
  kb = _KB(scale, seed)
  plans = {(e.id, t): plan_document(e, t, seed) for e in kb.entities for t in TEMPLATES}
  docs = {key: _doc(kb.by_id[key[0]], key[1], render(plan, kb.by_id[key[0]]))
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
  sft = [row for e in seen for row in _qa(e, seed, questions_per_fact)]
  qa_test = [row for e in db_only for row in _qa(e, seed, questions_per_fact)]

  updates = _updates(kb, update_fraction)
  update_rows = []
  for entity_id, changed in updates.items():
    entity = kb.by_id[entity_id]
    for attr, new in changed.items():
      rng = random.Random(f"{seed}:{entity_id}:update:{attr}")
      update_rows.append({"entity": entity_id, "title": entity.name, "type": entity.type,
                          "attribute": attr, "old": entity.facts[attr], "new": new,
                          "question": _question(entity, attr, rng),
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


_FLAG_ARGS = ("scale", "seed", "heldout_template", "update_fraction", "retrofit_fraction",
              "questions_per_fact", "overwrite")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("output_dir", None, "Output directory.", required=True)
  flags.DEFINE_float("scale", None, "Entity count multiplier (default 1.0).")
  flags.DEFINE_integer("seed", None, "Seed (default 0).")
  flags.DEFINE_enum("heldout_template", None, list(TEMPLATES),
                    "Template kept out of the DB for db-only entities (default article).")
  flags.DEFINE_float("update_fraction", None, "Fraction of db-only entities updated.")
  flags.DEFINE_float("retrofit_fraction", None, "Fraction of seen entities in "
                     "retrofit.jsonl instead of pretrain.jsonl (default 0.5).")
  flags.DEFINE_integer("questions_per_fact", None, "Question phrasings per fact (1-3).")
  flags.DEFINE_bool("overwrite", None, "Regenerate even if complete.")
  from retro_jax.utils import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.define_gin_flags()


def main(argv: Sequence[str]) -> None:
  """Flags that are set override gin bindings; unset ones leave gin/defaults."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from retro_jax.utils import gin_utils  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  gin_utils.parse_gin(f.gin_file, f.gin_bindings)
  kwargs = {k: f[k].value for k in _FLAG_ARGS if f[k].value is not None}
  result = generate_corpus(f.output_dir, **kwargs)
  print(format_summary(result))
  print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  from retro_jax.utils import gin_utils as _gin_utils  # pylint: disable=g-import-not-at-top
  _gin_utils.run_with_gin_flags(main)
