"""The package's import graph keeps the layering of docs/architecture.md.

Read from the source (every import statement, function-local ones included), so a
cycle hidden behind a local import or a library module reaching up into an entry point
fails here, before anyone trips over it.
"""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "retro_jax"
ENTRY_POINTS = {f"{PACKAGE}.{m}" for m in
                ("train", "eval", "generate", "serve", "preprocess", "recipe")}
# Longest prefix wins. Entry points are 5; the benchmarks sit above everything.
LAYERS = {
    f"{PACKAGE}.utils": 0,
    f"{PACKAGE}.models": 1,
    f"{PACKAGE}.convert.sentence_encoder": 1,   # weights for models.bert
    f"{PACKAGE}.retrieval": 2,
    f"{PACKAGE}.data": 2,
    f"{PACKAGE}.training": 3,
    f"{PACKAGE}.inference": 4,
    f"{PACKAGE}.evaluation": 4,
    f"{PACKAGE}.serving": 4,
    f"{PACKAGE}.convert": 4,
    f"{PACKAGE}.bench": 6,
}
# Third-party modules a function may import lazily: optional, or heavy to import.
LAZY_OK = {"torch", "sentence_transformers", "tensorflow", "tensorflow_datasets", "seqio",
           "matplotlib", "selenium", "transformers", "megatron", "retro_pytorch"}


def _modules() -> dict[str, str]:
  mods = {}
  for dirpath, _, files in os.walk(os.path.join(REPO, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        mods[name.removesuffix(".__init__")] = path
  return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str) -> list[tuple[str, int, bool]]:
  """(imported name, line, inside a function) for every import in ``module``."""
  path = MODULES[module]
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  found = []

  def visit(node, local):
    for child in ast.iter_child_nodes(node):
      inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        found.extend((a.name, child.lineno, local) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = package.split(".")
          parts = parts[: len(parts) - child.level + 1]
          base = ".".join(parts + ([base] if base else []))
        # ``from pkg import submodule`` depends on the submodule (and pkg/__init__,
        # which is placed in pkg's layer); ``from module import name`` on the module.
        found.extend((f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base,
                      child.lineno, local) for a in child.names)
      visit(child, inner)

  visit(tree, False)
  return found


def _edges() -> dict[str, set[str]]:
  edges = {m: set() for m in MODULES}
  for m in MODULES:
    for name, _, _ in _imports(m):
      if name.startswith(PACKAGE + "."):
        target = _resolve(name)
        if target and target != m and not m.startswith(target + "."):
          edges[m].add(target)
  return edges


def _layer(module: str) -> int:
  if module in ENTRY_POINTS:
    return 5
  best = max((p for p in LAYERS if module == p or module.startswith(p + ".")),
             key=len, default=None)
  return LAYERS[best] if best else 0


def test_every_module_has_a_layer():
  unplaced = [m for m in MODULES if m != PACKAGE and m not in ENTRY_POINTS
              and not any(m == p or m.startswith(p + ".") for p in LAYERS)]
  assert not unplaced, f"modules outside the layer table: {unplaced}"


def test_no_import_cycles():
  edges = _edges()
  index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      strong(v)
  assert not cycles, f"import cycles: {cycles}"


def test_dependencies_point_down_and_entry_points_are_leaves():
  bad = []
  for m, targets in _edges().items():
    for t in targets:
      if t in ENTRY_POINTS and m != t and not m.startswith(f"{PACKAGE}.bench"):
        bad.append(f"{m} -> {t} (an entry point)")
      elif _layer(t) > _layer(m):
        bad.append(f"{m} (layer {_layer(m)}) -> {t} (layer {_layer(t)})")
  assert not bad, "imports reaching up:\n" + "\n".join(sorted(bad))


def test_function_local_imports_only_for_optional_heavy_dependencies():
  bad = [f"{os.path.relpath(MODULES[m], REPO)}:{line} {name}"
         for m in MODULES for name, line, local in _imports(m)
         if local and name.split(".")[0] not in LAZY_OK]
  assert not bad, "function-local imports (import at the top instead):\n" + "\n".join(bad)


@pytest.mark.parametrize("broken", ["cycle", "upward", "local"])
def test_the_checks_fail_on_a_broken_graph(broken, monkeypatch):
  """The checks above can fail: inject one bad import and see each one catch it."""
  real = _imports

  def fake(module):
    extra = []
    if broken == "cycle" and module == f"{PACKAGE}.models.layers":
      extra = [(f"{PACKAGE}.models.retro", 1, False)]    # retro imports layers
    if broken == "upward" and module == f"{PACKAGE}.models.cca":
      extra = [(f"{PACKAGE}.training.trainer", 1, False)]
    if broken == "local" and module == f"{PACKAGE}.models.cca":
      extra = [("json", 1, True)]
    return real(module) + extra

  monkeypatch.setitem(globals(), "_imports", fake)
  check = {"cycle": test_no_import_cycles,
           "upward": test_dependencies_point_down_and_entry_points_are_leaves,
           "local": test_function_local_imports_only_for_optional_heavy_dependencies}[broken]
  with pytest.raises(AssertionError):
    check()
