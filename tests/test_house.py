"""Structure of the package, read from its source with `ast` (cheap, no imports):

- no module outside the package imports a private name of it;
- no function in qwen_image_rl/ is longer than 100 lines;
- no import circle inside qwen_image_rl/, counting imports inside functions (lazy) too;
- no mesh entered as a context manager (deprecated: flax drops activation constraints under
  it; `parallel.sharding_context` uses jax.set_mesh), and the
  package does not edit sys.path.
"""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "qwen_image_rl"
MAX_FUNCTION_LINES = 100


def _python_files(*roots):
  for root in roots:
    for dirpath, _, files in os.walk(os.path.join(REPO, root)):
      for f in sorted(files):
        if f.endswith(".py"):
          yield os.path.join(dirpath, f)


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


@pytest.fixture(scope="module")
def package():
  """{module name: (path, ast)} of every module of the package."""
  return {_module_name(p): (p, ast.parse(open(p).read(), p)) for p in _python_files(PKG)}


def _imported_modules(tree, module: str, is_package: bool, known) -> set[str]:
  """Package modules a module imports anywhere in its body (`from a import b` counts as a.b
  when that is a module, else as a)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
  return {m for m in out if m in known and m != module}


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
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
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_circle_inside_the_package(package):
  graph = {}
  for module, (path, tree) in package.items():
    deps = _imported_modules(tree, module, path.endswith("__init__.py"), package)
    # A package's own submodules are imported with it: not an edge back into the parent.
    graph[module] = {d for d in deps if not module.startswith(d + ".")}
  assert _cycles(graph) == []


def test_no_function_longer_than_100_lines(package):
  long = [
    f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} "
    f"({node.end_lineno - node.lineno + 1} lines)"
    for path, tree in package.values()
    for node in ast.walk(tree)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
  ]
  assert long == []


def test_nothing_outside_the_package_imports_its_private_names():
  private = []
  for path in _python_files("benchmarks", "tests", "configs", "notebooks"):
    tree = ast.parse(open(path).read(), path)
    aliases = set()  # names bound to package modules, e.g. `from qwen_image_rl.rl import rollout`
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PKG):
        private += [f"{path}: {a.name}" for a in node.names if a.name.startswith("_")]
        aliases |= {a.asname or a.name for a in node.names}
      elif isinstance(node, ast.Import):
        aliases |= {a.asname or a.name for a in node.names if a.name.startswith(PKG)}
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
      ):
        private.append(f"{path}: {node.value.id}.{node.attr}")
  assert private == []


def test_no_deprecated_mesh_context_and_no_sys_path_edits():
  mesh_context = re.compile(r"^\s*with\s+[\w.]*mesh\s*[:,]", re.M)
  offenders = [
    p for p in _python_files(PKG, "benchmarks", "tests") if mesh_context.search(open(p).read())
  ]
  assert offenders == []
  edits = [
    p
    for p in _python_files(PKG)
    if "sys.path.insert" in open(p).read() or "sys.path.append" in open(p).read()
  ]
  assert edits == []
