"""retro_jax.data.debian_text: the Python documentation's reST sources as recipe
documents (sections, markup removed, ids, the package layout)."""

from __future__ import annotations

import json
import os

import pytest

from retro_jax.data import debian_text

# The opening of Doc/library/bisect.rst of Python 3.11 (python3.11-doc, html/_sources/
# library/bisect.rst.txt), shortened. Copyright (c) 2001-2023 Python Software
# Foundation; All Rights Reserved. PSF License Agreement.
BISECT = """\
:mod:`bisect` --- Array bisection algorithm
===========================================

.. module:: bisect
   :synopsis: Array bisection algorithms for binary searching.
.. sectionauthor:: Fred L. Drake, Jr. <fdrake@acm.org>
.. example based on the PyModules FAQ entry by Aaron Watters <arw@pythonpros.com>

**Source code:** :source:`Lib/bisect.py`

--------------

This module provides support for maintaining a list in sorted order without
having to sort the list after each insertion.  The module is called :mod:`bisect`
because it uses a basic bisection algorithm to do its work.

.. function:: bisect_left(a, x, lo=0, hi=len(a), *, key=None)

   Locate the insertion point for *x* in *a* to maintain sorted order.
   The return value is suitable for use as the first
   parameter to ``list.insert()`` assuming that *a* is already sorted.

   *key* specifies a :term:`key function` of one argument.

   .. versionchanged:: 3.10
      Added the *key* parameter.

.. index:: single: bisect
   single: sorted lists

Searching Sorted Lists
----------------------

The above :func:`~bisect.bisect` functions are useful for finding insertion points
but can be tricky to use for common searching tasks (see `the recipe
<https://code.activestate.com/recipes/577197>`_)::

    def index(a, x):
        'Locate the leftmost value exactly equal to x'
        i = bisect_left(a, x)

Short
-----

Tiny.
"""

EXPECTED_FIRST = """\
bisect --- Array bisection algorithm

Source code: Lib/bisect.py

This module provides support for maintaining a list in sorted order without
having to sort the list after each insertion.  The module is called bisect
because it uses a basic bisection algorithm to do its work.

bisect_left(a, x, lo=0, hi=len(a), *, key=None)

   Locate the insertion point for x in a to maintain sorted order.
   The return value is suitable for use as the first
   parameter to list.insert() assuming that a is already sorted.

   key specifies a key function of one argument.

   3.10
      Added the key parameter."""

EXPECTED_SECOND = """\
Searching Sorted Lists

The above bisect.bisect functions are useful for finding insertion points
but can be tricky to use for common searching tasks (see the recipe):

    def index(a, x):
        'Locate the leftmost value exactly equal to x'
        i = bisect_left(a, x)"""


def test_rst_sections_exact_text():
  sections = debian_text.rst_sections(BISECT)
  assert [title for title, _ in sections] == [
      "bisect --- Array bisection algorithm", "Searching Sorted Lists", "Short"]
  assert sections[0][1] == EXPECTED_FIRST
  assert sections[1][1] == EXPECTED_SECOND
  assert sections[2][1] == "Short\n\nTiny."


def test_overlined_heading_and_text_before_first_heading():
  source = "Intro line.\n\n=====\nTitle\n=====\n\nBody text.\n"
  assert debian_text.rst_sections(source) == [("", "Intro line."),
                                               ("Title", "Title\n\nBody text.")]


def test_page_documents_merges_short_sections_and_ids_are_unique():
  rows = debian_text.page_documents("library/bisect", BISECT, min_chars=40)
  assert [r["id"] for r in rows] == ["library/bisect#bisect-array-bisection-algorithm",
                                     "library/bisect#searching-sorted-lists"]
  assert rows[1]["text"] == EXPECTED_SECOND + "\n\nShort\n\nTiny."
  assert all(r["page"] == "library/bisect" for r in rows)
  twice = "Abc\n---\n\n" + "x" * 50 + "\n\nAbc\n---\n\n" + "y" * 50 + "\n"
  assert [r["id"] for r in debian_text.page_documents("p", twice)] == ["p#abc"]
  assert [r["id"] for r in debian_text.page_documents("p", twice, min_chars=10)] == [
      "p#abc", "p#abc-2"]


def _package_tree(root):
  base = os.path.join(root, debian_text.SOURCES_SUBDIR)
  for page, text in (("library/bisect", BISECT), ("library/zz", "Z\n=\n\n" + "z" * 300),
                     ("howto/sorting", "Sorting\n=======\n\n" + "s" * 300)):
    path = os.path.join(base, page + debian_text.SOURCE_SUFFIX)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  return base


def test_python_doc_documents_from_the_package_layout(tmp_path):
  base = _package_tree(str(tmp_path))
  rows = list(debian_text.python_doc_documents(str(tmp_path)))
  assert [r["page"] for r in rows] == ["library/bisect", "library/bisect", "library/zz"]
  assert rows == list(debian_text.python_doc_documents(base))   # _sources itself
  every = list(debian_text.python_doc_documents(str(tmp_path), sections=()))
  assert [r["page"] for r in every] == ["howto/sorting"] + [r["page"] for r in rows]


def test_main_writes_recipe_jsonl(tmp_path, capsys):
  _package_tree(str(tmp_path / "pkg"))
  out = tmp_path / "docs.jsonl"
  debian_text.main(["--root", str(tmp_path / "pkg"), "--output", str(out),
                    "--sections", "library,howto"])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 4 and all(isinstance(r["text"], str) and r["id"] for r in rows)
  assert len({r["id"] for r in rows}) == 4
  assert "4 documents from 3 pages" in capsys.readouterr().out


def test_missing_sources_name_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    list(debian_text.python_doc_documents(str(tmp_path)))
  _package_tree(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no .rst.txt pages"):
    list(debian_text.python_doc_documents(str(tmp_path), sections=("faq",)))
