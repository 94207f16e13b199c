"""gin at the edges: parse gin files and bindings the same way in every entry point.

Files are looked up as given, then under the repository's ``gin/``, ``gin/models/`` and
``gin/recipes/`` (so ``--gin_file=tiny.gin`` and ``include 'instructretro_arch.gin'``
work from any directory). Bindings are ``KEY=VALUE`` strings (``--gin.KEY=VALUE`` on
command lines is rewritten to this form by ``split_gin_flags``).
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import gin

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "gin")
_SEARCH = (GIN_DIR, os.path.join(GIN_DIR, "models"), os.path.join(GIN_DIR, "recipes"))
_added_search_paths: set[str] = set()


def _resolve(path: str) -> str:
  if os.path.exists(path):
    return path
  for directory in _SEARCH:
    candidate = os.path.join(directory, path)
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(f"gin file {path!r} not found (looked in the working directory "
                          f"and {', '.join(_SEARCH)})")


def parse_gin(files: Sequence[str] = (), bindings: Sequence[str] = (),
              finalize: bool = False) -> None:
  """Parses gin files and bindings; errors name the file or binding at fault."""
  resolved = [_resolve(f) for f in files]
  for directory in _SEARCH + tuple(os.path.dirname(os.path.abspath(f)) for f in resolved):
    if os.path.isdir(directory) and directory not in _added_search_paths:
      gin.add_config_file_search_path(directory)
      _added_search_paths.add(directory)
  # gin logs an ERROR line for every search path an include is not under; a missing
  # file still raises, so silence that search.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=finalize)
  finally:
    logging.set_verbosity(verbosity)


def _gin_value(value: str) -> str:
  """Quotes a bare string (``/tmp/run`` -> ``'/tmp/run'``); keeps literals and refs."""
  if value.startswith(("@", "%", "'", '"')):
    return value
  try:
    ast.literal_eval(value)
    return value
  except (ValueError, SyntaxError):
    return repr(value) if value not in ("True", "False", "None") else value


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Turns ``--gin.KEY=VALUE`` arguments into gin bindings (t5x style).

  Bare strings are quoted for you: ``--gin.MODEL_DIR=/tmp/run`` binds ``'/tmp/run'``.
  Returns (remaining argv, bindings).
  """
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      key, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{key} = {_gin_value(value)}")
    else:
      rest.append(arg)
  return rest, bindings


def define_gin_flags() -> None:
  """The ``--gin_file`` / ``--gin_bindings`` flags every entry point takes (define them
  in ``__main__`` only, so that entry points can import each other)."""
  caller = sys._getframe(1).f_globals.get("__name__")  # pylint: disable=protected-access
  module = sys.argv[0] if caller == "__main__" else caller   # so --helpshort lists them
  flags.DEFINE_multi_string("gin_file", [], "gin files (searched in gin/ too).",
                            module_name=module)
  flags.DEFINE_multi_string("gin_bindings", [], "gin bindings KEY=VALUE (or "
                            "--gin.KEY=VALUE).", module_name=module)


def run_with_gin_flags(main) -> None:
  """``absl.app.run(main)`` after turning ``--gin.KEY=VALUE`` into ``--gin_bindings``."""
  rest, bindings = split_gin_flags(sys.argv)
  sys.argv = rest + [f"--gin_bindings={b}" for b in bindings]
  app.run(main)
