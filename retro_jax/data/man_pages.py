r"""Real text from Debian packages: Linux manual pages as recipe documents.

The Debian packages ``manpages`` (file formats, conventions: sections 4, 5, 7) and
``manpages-dev`` (system calls and library functions: sections 2, 3) ship the Linux
man-pages project's pages as gzipped roff under ``usr/share/man/man<N>/``. This module
renders each page with groff to plain text, one recipe document per page;
``retro_jax.data.debian_text`` writes them as the jsonl that ``python -m
retro_jax.recipe --documents=...`` reads:

    cd /tmp && apt-get download manpages manpages-dev
    for f in manpages*.deb; do dpkg-deb -x $f man; done
    python -m retro_jax.data.debian_text --format=man-pages --root=/tmp/man \
        --output=/tmp/man.jsonl

Rows: ``{"id": "man2/read.2", "page": "read(2)", "title": "read - read from a file
descriptor", "text": "NAME\nread - read from a file descriptor\n\nLIBRARY\n..."}``.

Unlike the Python library reference (``debian_text``), these pages repeat one another
a great deal: the ERRORS entries of system calls (``EFAULT buf is outside your
accessible address space.``), LIBRARY and STANDARDS lines, the synopses of function
families. Text that recurs across documents is what RETRO's retrieval can copy from.

Rendering: ``groff -man -Tutf8 -Kutf-8`` without hyphenation, with left-adjusted
lines 2,000 ens long (so a paragraph is one line) and without terminal escapes; the
running header and footer lines are dropped, lines lose the body indent of 7 columns
and trailing spaces, runs of blank lines become one. Pages that only source another
(``.so man3/printf.3``: an alias) are skipped, as are byte-identical duplicates.

Needs ``groff`` (Debian's ``groff-base``, installed with ``man-db``). Licences: the
pages carry their own (``SPDX-License-Identifier`` lines: mostly the
Linux-man-pages-copyleft licence, GPL and BSD variants), all allowing redistribution
(``/usr/share/doc/manpages/copyright``). The tests render pages written for them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Iterator, Sequence

from retro_jax.data.corpus import open_binary

MAN_SUBDIR = os.path.join("usr", "share", "man")
DEFAULT_SECTIONS = ("1", "2", "3", "4", "5", "6", "7", "8")
BODY_INDENT = 7
GROFF_ARGS = ("-man", "-Tutf8", "-Kutf-8", "-P-cbou", "-rLL=2000n", "-rHY=0", "-dAD=l")

_SECTION_DIR = re.compile(r"^man(\w+)$")
_ALIAS = re.compile(r"^\.so\s+\S+\s*$")


def is_alias(source: str) -> bool:
  """Whether a roff page only sources another page (``.so man3/printf.3``), comments
  aside."""
  lines = [line for line in source.splitlines()
           if line.strip() and not line.startswith(('.\\"', "'\\\"", '.\\#'))]
  return len(lines) == 1 and _ALIAS.match(lines[0].strip()) is not None


def render(source: str, *, name: str = "<page>", groff: str = "groff") -> str:
  """``source`` (roff with the man macros) as text, as ``groff GROFF_ARGS`` prints it.

  Raises:
    FileNotFoundError: ``groff`` is not installed.
    RuntimeError: groff failed on the page (``name`` and groff's message).
  """
  binary = shutil.which(groff)
  if binary is None:
    raise FileNotFoundError(
        f"{groff}: not found; man pages are rendered with groff (Debian: apt-get "
        "install groff-base)")
  done = subprocess.run([binary, *GROFF_ARGS], input=source.encode("utf-8"),
                        capture_output=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{name}: groff exited with {done.returncode}: "
                       f"{done.stderr.decode('utf-8', 'replace').strip()[:500]}")
  return done.stdout.decode("utf-8", "replace")


def page_text(rendered: str) -> str:
  """groff's output of one page as document text (module docstring): without the
  running header and footer, dedented, without runs of blank lines."""
  lines = [line.rstrip() for line in rendered.splitlines()]
  body = [i for i, line in enumerate(lines) if line]
  if len(body) < 3:
    return ""
  out: list[str] = []
  for line in lines[body[0] + 1:body[-1]]:
    indent = len(line) - len(line.lstrip(" "))
    line = line[min(indent, BODY_INDENT):]
    if line or (out and out[-1]):
      out.append(line)
  return "\n".join(out).strip("\n")


def _title(text: str) -> str:
  """The line after the NAME heading (``read - read from a file descriptor``)."""
  lines = text.splitlines()
  for i, line in enumerate(lines[:-1]):
    if line.strip() == "NAME":
      return lines[i + 1].strip()
  return ""


def page_files(root: str, sections: Sequence[str] = DEFAULT_SECTIONS) -> list[str]:
  """The page files (``man2/read.2.gz`` or uncompressed) of ``sections`` under
  ``root`` (a ``dpkg-deb -x`` of the packages, or its ``usr/share/man``), sorted;
  translations (``usr/share/man/<language>/``) are not read."""
  packaged = os.path.join(root, MAN_SUBDIR)
  base = packaged if os.path.isdir(packaged) else root
  if not os.path.isdir(base):
    raise FileNotFoundError(f"{root}: not a directory")
  files = []
  for entry in sorted(os.listdir(base)):
    match = _SECTION_DIR.match(entry)
    if match and (not sections or match.group(1) in sections):
      directory = os.path.join(base, entry)
      files += [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
  if not files:
    raise FileNotFoundError(
        f"{base}: no man pages in sections {list(sections)} (expected man<N>/ "
        f"directories under {MAN_SUBDIR} of a `dpkg-deb -x` of manpages / manpages-dev)")
  return files


def _read_source(path: str) -> str:
  with open_binary(path) as f:
    return f.read().decode("utf-8", "replace")


def man_page_documents(root: str, *, sections: Sequence[str] = DEFAULT_SECTIONS,
                       min_chars: int = 200, groff: str = "groff") -> Iterator[dict]:
  """The recipe documents of the man pages under ``root``.

  Args:
    root: a ``dpkg-deb -x`` of manpages and/or manpages-dev (or its usr/share/man).
    sections: the man sections to read (``"2"``, ``"3"``...); empty for every one.
    min_chars: pages whose text is shorter are skipped.
    groff: the groff binary.

  Yields:
    Rows ``{"id", "page", "title", "text"}`` in sorted file order, aliases and
    duplicate sources skipped.
  """
  seen: set[str] = set()
  for path in page_files(root, sections):
    source = _read_source(path)
    if is_alias(source) or source in seen:
      continue
    seen.add(source)
    directory, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
    name = name[:-3] if name.endswith(".gz") else name
    text = page_text(render(source, name=path, groff=groff))
    if len(text) < min_chars:
      continue
    stem, _, section = name.rpartition(".")
    yield {"id": f"{directory}/{name}", "page": f"{stem or name}({section})",
           "title": _title(text), "text": text}
