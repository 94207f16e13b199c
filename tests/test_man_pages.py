"""retro_jax.data.man_pages: Linux man pages rendered by groff as recipe documents
(text, aliases and duplicates, the package layout, errors)."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest

from retro_jax.data import debian_text, man_pages

needs_groff = pytest.mark.skipif(shutil.which("groff") is None,
                                 reason="groff is not installed")

# A page written for these tests, in the man-pages project's markup.
FROB = r""".\" A page written for the tests.
.TH frob 2 2024-01-01 "Linux man-pages 6.03"
.SH NAME
frob \- frobnicate a file descriptor
.SH LIBRARY
Standard C library
.RI ( libc ", " \-lc )
.SH SYNOPSIS
.nf
.B #include <frob.h>
.PP
.BI "int frob(int " fd ", size_t " count );
.fi
.SH DESCRIPTION
.BR frob ()
frobnicates up to
.I count
bytes of the file referred to by the file descriptor
.IR fd .
This sentence is long enough that a terminal of eighty columns would wrap it onto a
second line, and groff would hyphenate a word such as incomprehensibilities.
.PP
A second paragraph, indented:
.PP
.in +4n
.EX
frob(fd, 10);
.EE
.in
.SH ERRORS
.TP
.B EBADF
.I fd
is not a valid file descriptor.
.TP
.B EFAULT
.I buf
is outside your accessible address space.
.SH SEE ALSO
.BR read (2)
"""

FROB_TEXT = """\
NAME
frob - frobnicate a file descriptor

LIBRARY
Standard C library (libc, -lc)

SYNOPSIS
#include <frob.h>

int frob(int fd, size_t count);

DESCRIPTION
frob() frobnicates up to count bytes of the file referred to by the file descriptor \
fd.  This sentence is long enough that a terminal of eighty columns would wrap it onto \
a second line, and groff would hyphenate a word such as incomprehensibilities.

A second paragraph, indented:

    frob(fd, 10);

ERRORS
EBADF  fd is not a valid file descriptor.

EFAULT buf is outside your accessible address space.

SEE ALSO
read(2)"""


@needs_groff
def test_page_text_exact():
  """One paragraph per line, no hyphenation, header and footer gone, body dedented
  (nested indents kept), single blank lines."""
  rendered = man_pages.render(FROB)
  assert rendered.splitlines()[0].startswith("frob(2)")      # the header is rendered
  assert man_pages.page_text(rendered) == FROB_TEXT


def test_alias_pages():
  assert man_pages.is_alias('.so man3/printf.3\n')
  assert man_pages.is_alias('.\\" Copyright\n.\\"\n.so man2/read.2\n\n')
  assert not man_pages.is_alias(FROB)
  assert not man_pages.is_alias(".so man3/a.3\n.SH NAME\nx\n")


def _write(path, text, compress=True):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if compress:
    with gzip.open(path + ".gz", "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)


def _package_tree(root):
  base = os.path.join(root, man_pages.MAN_SUBDIR)
  _write(os.path.join(base, "man2", "frob.2"), FROB, compress=False)
  _write(os.path.join(base, "man2", "frob64.2"), ".so man2/frob.2\n")      # alias
  _write(os.path.join(base, "man2", "frob2.2"), FROB)                      # duplicate
  other = FROB.replace("frob", "grind").replace("2024-01-01", "2024-02-02")
  _write(os.path.join(base, "man3", "grind.3"), other.replace(".TH grind 2", ".TH grind 3"))
  _write(os.path.join(base, "man7", "tiny.7"), '.TH tiny 7\n.SH NAME\ntiny \\- short\n')
  _write(os.path.join(base, "fr", "man2", "frob.2"), FROB.replace("NAME", "NOM"))
  return base


@needs_groff
def test_documents_from_the_package_layout(tmp_path, monkeypatch):
  base = _package_tree(str(tmp_path))
  monkeypatch.chdir(base)       # where groff would find the alias's `.so man2/frob.2`
  rows = list(man_pages.man_page_documents(str(tmp_path)))
  assert [(r["id"], r["page"], r["title"]) for r in rows] == [
      ("man2/frob.2", "frob(2)", "frob - frobnicate a file descriptor"),
      ("man3/grind.3", "grind(3)", "grind - grindnicate a file descriptor")]
  assert rows[0]["text"] == FROB_TEXT
  assert rows == list(man_pages.man_page_documents(base))          # usr/share/man itself
  assert [r["id"] for r in man_pages.man_page_documents(base, sections=("3",))] == [
      "man3/grind.3"]
  short = list(man_pages.man_page_documents(base, min_chars=10))
  assert [r["id"] for r in short] == ["man2/frob.2", "man3/grind.3", "man7/tiny.7"]


@needs_groff
def test_debian_text_writes_the_man_pages_jsonl(tmp_path, capsys):
  _package_tree(str(tmp_path / "pkg"))
  out = tmp_path / "man.jsonl"
  debian_text.main(["--format", "man-pages", "--root", str(tmp_path / "pkg"),
                    "--output", str(out)])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == ["man2/frob.2", "man3/grind.3"]
  assert rows[0]["text"] == FROB_TEXT
  assert "2 documents from 2 pages" in capsys.readouterr().out
  debian_text.main(["--format", "man-pages", "--root", str(tmp_path / "pkg"),
                    "--output", str(out), "--sections", "3"])
  assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [
      "man3/grind.3"]


def test_errors_name_the_directory_and_the_binary(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    man_pages.page_files(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no man pages"):
    man_pages.page_files(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no-such-groff: not found"):
    man_pages.render(FROB, groff="no-such-groff")


@needs_groff
def test_groff_failure_names_the_page():
  with pytest.raises(RuntimeError, match="bad.2: groff exited"):
    man_pages.render(FROB, name="bad.2", groff="false")
