"""Wording helpers of the knowledge base and the documents: a/an, digit groups,
capitals, whole-phrase matching."""

from __future__ import annotations

import re


def article(value: str) -> str:
  return "an" if value[:1].lower() in "aeiou" else "a"


def group_digits(number: int) -> str:
  return f"{number:,}"


def title_case(word: str) -> str:
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

