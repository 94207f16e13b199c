r"""Real text from a Debian package: the Python documentation as recipe documents.

The Debian package ``python3.11-doc`` (``python3-doc`` depends on it) ships the
Python 3.11 documentation as HTML together with its reStructuredText sources, one
``.rst.txt`` file per page under ``usr/share/doc/python3.11/html/_sources/``. This
module turns those sources into the jsonl that ``python -m retro_jax.recipe
--documents=...`` reads: one document per section of a page, its text as plain prose.

    cd /tmp && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pydoc
    python -m retro_jax.data.debian_text --root=/tmp/pydoc --output=/tmp/pydoc.jsonl

The same command writes the Linux man pages with ``--format=man-pages``
(``retro_jax.data.man_pages``).

Rows: ``{"id": "library/json#basic-usage", "page": "library/json", "title":
"Basic Usage", "text": "..."}``. The page's own title heads the text of its first
section, each later section's text starts with its heading.

What the conversion does to a page (light, line-based; reST has no reference parser
in the standard library and the recipe only needs readable text):

* a section starts at a heading: a text line underlined (optionally also overlined)
  with a run of one punctuation character at least as long as the title; the title
  line is kept, the under/overlines are dropped;
* directive lines ``.. name:: argument`` become their argument for the prose
  directives (``note``, ``warning``, ``versionadded``, ``versionchanged``,
  ``deprecated``, ``function``, ``class``, ``method``, ``attribute``, ``data``,
  ``exception``, ``decorator``, ...); bookkeeping directives (``module``,
  ``moduleauthor``, ``sectionauthor``, ``index``, ``toctree``, ``highlight``,
  ``testsetup``, ``_label:`` targets, comments) are dropped with their indented
  option lines (``:synopsis: ...``);
* inline roles ``:mod:`json``` / ``:func:`~os.path.join``` keep their target text
  (``json``, ``os.path.join``; a leading ``~`` or ``!`` is dropped), hyperlinks
  ```text <url>`_`` keep ``text``, ``**bold**`` and ````literal```` lose the markup,
  a paragraph ending ``::`` ends with ``:``;
* code blocks and doctests are kept as they are (they are part of the text a model of
  this documentation has to predict).

Sections with fewer than ``min_chars`` characters after conversion are merged into
the section before them (so that a heading followed by one line is not a document).

Licence: the Python documentation is under the PSF License Agreement (and the Zero
Clause BSD License for its code examples): ``/usr/share/doc/python3.11-doc/copyright``
in the package. Both allow redistribution with the copyright notice, so
``tests/test_debian_text.py`` carries a few lines of it as its sample input.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Iterator, Optional, Sequence

from retro_jax.data import man_pages
from retro_jax.utils.io import atomic_write_jsonl

SOURCES_SUBDIR = os.path.join("usr", "share", "doc", "python3.11", "html", "_sources")
SOURCE_SUFFIX = ".rst.txt"
DEFAULT_SECTIONS = ("library",)

_ADORNMENT = re.compile(r"^([=\-~^*#+\"'`:.<>_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_TARGET = re.compile(r"^\s*\.\.\s+_[^:]*:.*$")
_COMMENT = re.compile(r"^\s*\.\.(\s.*)?$")
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_REF = re.compile(r"`([^`]+)`_\b")
_FOOTNOTE = re.compile(r"\s*\[#[\w-]*\]_")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"\*\*([^*]+)\*\*|(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])")
_DROP_DIRECTIVES = frozenset({
    "module", "currentmodule", "moduleauthor", "sectionauthor", "index", "toctree",
    "highlight", "testsetup", "testcleanup", "only", "raw", "include", "image",
    "figure", "productionlist", "rubric", "contents", "impl-detail", "audit-event",
    "audit-event-table", "opcode", "pdbcommand", "literalinclude", "program",
    "c:namespace", "cmdoption", "envvar", "sectnum", "tabularcolumns", "default-role",
    "testoutput", "role", "seealso-index"})


def _role_text(match: re.Match) -> str:
  target = match.group(1)
  if "<" in target and target.endswith(">"):       # :ref:`text <label>`
    target = target[:target.index("<")].rstrip()
  return target.lstrip("~!")


def _inline(line: str) -> str:
  """Inline markup of one line removed (roles, links, literals, emphasis)."""
  line = _ROLE.sub(_role_text, line)
  line = _LINK.sub(r"\1", line)
  line = _REF.sub(r"\1", line)
  line = _FOOTNOTE.sub("", line)
  line = _LITERAL.sub(r"\1", line)
  line = _EMPHASIS.sub(lambda m: m.group(1) or m.group(2), line)
  if line.rstrip().endswith("::"):
    stripped = line.rstrip()[:-2].rstrip()
    line = stripped + ":" if stripped else ""
  return line


def _is_heading(lines: Sequence[str], i: int) -> bool:
  """Whether ``lines[i]`` is a title underlined by ``lines[i + 1]``."""
  if i + 1 >= len(lines):
    return False
  title, under = lines[i].rstrip(), lines[i + 1].rstrip()
  return (bool(title.strip()) and not title.startswith(" ")
          and _ADORNMENT.match(under) is not None and len(under) >= len(title.strip()))


def rst_sections(source: str) -> list[tuple[str, str]]:
  """A reST page as ``(title, text)`` sections, markup removed (module docstring).

  Args:
    source: the page's reST source.

  Returns:
    The sections in page order; text before the first heading belongs to the first
    section (title ``""`` if the page has no heading at all). Each text starts with
    its heading line.
  """
  lines = source.replace("\r\n", "\n").split("\n")
  sections: list[tuple[str, list[str]]] = [("", [])]
  skip_indent: Optional[int] = None     # dropping a directive's indented body
  i = 0
  while i < len(lines):
    line = lines[i]
    if skip_indent is not None:
      if not line.strip() or len(line) - len(line.lstrip()) > skip_indent:
        i += 1
        continue
      skip_indent = None
    if _ADORNMENT.match(line) and _is_heading(lines, i + 1):     # overline
      i += 1
      continue
    if _is_heading(lines, i):
      title = _inline(line.strip())
      sections.append((title, [title, ""]))
      i += 2
      continue
    if _ADORNMENT.match(line):                                    # a transition
      i += 1
      continue
    directive = _DIRECTIVE.match(line)
    if directive:
      indent, name, argument = directive.groups()
      if name in _DROP_DIRECTIVES:
        skip_indent = len(indent)
      else:
        # Prose and API directives keep their argument; their options are dropped.
        j = i + 1
        while j < len(lines) and re.match(r"^\s+:[\w-]+:", lines[j]):
          j += 1
        sections[-1][1].append(indent + _inline(argument) if argument else "")
        i = j
        continue
      i += 1
      continue
    if _TARGET.match(line) or _COMMENT.match(line):
      skip_indent = len(line) - len(line.lstrip())
      i += 1
      continue
    sections[-1][1].append(_inline(line.rstrip()))
    i += 1
  out = []
  for title, body in sections:
    text = _LINK.sub(r"\1", _ROLE.sub(_role_text, "\n".join(body)))   # roles across lines
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if text:
      out.append((title, text))
  return out


def _slug(title: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def page_documents(page: str, source: str, *, min_chars: int = 200) -> list[dict]:
  """One page's recipe documents: its sections, short ones merged into the previous.

  Args:
    page: the page's name (its path under ``_sources`` without ``.rst.txt``).
    source: its reST source.
    min_chars: sections shorter than this are appended to the section before them.

  Returns:
    Rows ``{"id", "page", "title", "text"}``; ids are unique within the page.
  """
  merged: list[list[str]] = []
  for title, text in rst_sections(source):
    if merged and len(text) < min_chars:
      merged[-1][1] += "\n\n" + text
    else:
      merged.append([title, text])
  rows, seen = [], set()
  for title, text in merged:
    slug = _slug(title)
    doc_id, n = f"{page}#{slug}", 1
    while doc_id in seen:
      n += 1
      doc_id = f"{page}#{slug}-{n}"
    seen.add(doc_id)
    rows.append({"id": doc_id, "page": page, "title": title, "text": text})
  return rows


def sources_dir(root: str) -> str:
  """The ``_sources`` directory of a ``dpkg-deb -x`` of python3.11-doc (or ``root``
  itself when it holds ``.rst.txt`` pages)."""
  packaged = os.path.join(root, SOURCES_SUBDIR)
  if os.path.isdir(packaged):
    return packaged
  for _, _, names in os.walk(root):
    if any(name.endswith(SOURCE_SUFFIX) for name in names):
      return root
  raise FileNotFoundError(
      f"{root}: no Python documentation sources (expected {SOURCES_SUBDIR} under a "
      "`dpkg-deb -x` of python3.11-doc, or a directory of *.rst.txt files)")


def python_doc_documents(root: str, *, sections: Sequence[str] = DEFAULT_SECTIONS,
                         min_chars: int = 200) -> Iterator[dict]:
  """The recipe documents of the Python documentation under ``root``.

  Args:
    root: a ``dpkg-deb -x`` of python3.11-doc, or its ``_sources`` directory.
    sections: the documentation's top-level directories to read (``library``,
      ``howto``, ``reference``, ``tutorial``, ``c-api``, ``whatsnew``, ``faq``...);
      empty for all of it.
    min_chars: see ``page_documents``.

  Yields:
    Rows ``{"id", "page", "title", "text"}``, pages in sorted path order.
  """
  base = sources_dir(root)
  pages = []
  for dirpath, dirnames, names in os.walk(base):
    dirnames.sort()
    for name in names:
      if name.endswith(SOURCE_SUFFIX):
        page = os.path.relpath(os.path.join(dirpath, name), base)[:-len(SOURCE_SUFFIX)]
        page = page.replace(os.sep, "/")
        if not sections or page.split("/")[0] in sections:
          pages.append(page)
  if not pages:
    raise FileNotFoundError(f"{base}: no {SOURCE_SUFFIX} pages in sections {list(sections)}")
  for page in sorted(pages):
    with open(os.path.join(base, page + SOURCE_SUFFIX), encoding="utf-8") as f:
      yield from page_documents(page, f.read(), min_chars=min_chars)


# --format -> (the reader of the package's documents, its default sections)
READERS = {"python-doc": (python_doc_documents, DEFAULT_SECTIONS),
           "man-pages": (man_pages.man_page_documents, man_pages.DEFAULT_SECTIONS)}


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      description="Real text from Debian packages as the jsonl of `recipe --documents`: "
      "the Python documentation (python3.11-doc; this module) or the Linux man pages "
      "(manpages, manpages-dev; retro_jax.data.man_pages).")
  parser.add_argument("--format", choices=sorted(READERS), default="python-doc",
                      help="python-doc: one document per section of a reST page; "
                      "man-pages: one document per page, rendered by groff")
  parser.add_argument("--root", required=True,
                      help="a `dpkg-deb -x` of the package(s): python3.11-doc (or its "
                      "html/_sources), or manpages / manpages-dev (or its usr/share/man)")
  parser.add_argument("--output", required=True, help="the jsonl to write")
  parser.add_argument("--sections", default=None,
                      help="comma-separated top-level directories (python-doc, default "
                      f"{','.join(DEFAULT_SECTIONS)}) or man sections (man-pages, default "
                      f"{','.join(man_pages.DEFAULT_SECTIONS)}); empty for all")
  parser.add_argument("--min_chars", type=int, default=200)
  args = parser.parse_args(argv)
  read, default = READERS[args.format]
  sections = default if args.sections is None else [
      s for s in args.sections.split(",") if s]
  rows = list(read(args.root, sections=sections, min_chars=args.min_chars))
  atomic_write_jsonl(args.output, rows)
  chars = sum(len(r["text"]) for r in rows)
  pages = len({r["page"] for r in rows})
  print(f"wrote {args.output}: {len(rows)} documents from {pages} pages, {chars} characters")


if __name__ == "__main__":
  main()
