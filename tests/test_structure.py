"""The shape of the code base, checked on its source text alone (AST and regular expressions; nothing of the code
base is imported, so these take seconds and need no torch of their own):

- (a) no import cycle among the modules of the ``shadowsparse`` package (module- and function-level imports; a
  submodule importing from its own package's __init__ counts, since that __init__ imports it);
- (b) no module imports another module's underscore-prefixed (private) name;
- (c) no function of ``shadowsparse/`` outside ``shadowsparse/kernels/`` is longer than 80 lines;
- (d) README.md, docs/*.md, comments and string literals of the code, and comments of conf/ and scripts/ cite only
  files, modules and config options that exist (and the design notes as docs/design.md).

Each check has a test of its own on a known input, so none passes by finding nothing.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "shadowsparse"
MAX_FUNCTION_LINES = 80
FIRST_PARTY = (PACKAGE, "tests", "benchmarks", "benchmark", "train", "research")


def _py_files(*roots: str) -> list[Path]:
    out: list[Path] = []
    for r in roots:
        p = ROOT / r
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
    return out


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    return {_module_name(f): f for f in _py_files(PACKAGE)}


def _parse(path: Path) -> ast.Module:
    """The file's AST; a file that does not parse reads as empty here and is reported by ``_syntax_errors``."""
    try:
        return ast.parse(path.read_text(), filename=str(path))
    except SyntaxError:
        return ast.Module(body=[], type_ignores=[])


def _syntax_errors(paths) -> list[str]:
    problems = []
    for path in paths:
        try:
            ast.parse(path.read_text(), filename=str(path))
        except SyntaxError as exc:
            problems.append(f"{path.relative_to(ROOT)}:{exc.lineno} does not parse: {exc.msg}")
    return problems


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run (at module level or inside functions), not those under ``if TYPE_CHECKING:``."""
    found: list = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_stmt(sub)
                continue
            visit_stmt(child)

    def visit_stmt(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <...> import``: level 1 is the importer's own package (for a package's
    __init__, the package itself), each further level one package up."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, known) -> list[tuple[str, str]]:
    """(target module, imported name or '') pairs of one import statement. ``import a.b.c`` targets a.b.c.
    ``from P import n`` targets P, whose namespace it reads (its __init__ when P is a package: a submodule that
    imports from its own package's __init__ is in a cycle with it), and also the submodule P.n when there is one."""
    if isinstance(node, ast.Import):
        return [(alias.name, "") for alias in node.names]
    target = _resolve_from(module, path.name == "__init__.py", node)
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out += [(target, ""), (sub, "")] if sub in known else [(target, alias.name)]
    return out


# -- (a) import cycles -------------------------------------------------------------------------------------------------

def import_graph() -> dict[str, dict[str, int]]:
    """Edges module -> {imported module of the package: line of the first such import}."""
    modules = _package_modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for mod, path in modules.items():
        for node in _runtime_imports(_parse(path)):
            for target, _ in _imported(mod, path, node, modules):
                while target and target not in modules and "." in target:  # import a.b.c of a name-less tail
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != mod:
                    graph[mod].setdefault(target, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def a_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """One concrete cycle through the first module of a component (shortest, by breadth-first search)."""
    start, members = comp[0], set(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for t in sorted(graph[m]):
                if t not in members:
                    continue
                if t == start:
                    path = [m]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if t not in parent:
                    parent[t] = m
                    nxt.append(t)
        frontier = nxt
    return comp


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    problems = _syntax_errors(_package_modules().values())
    for comp in strongly_connected(graph):
        cycle = a_cycle(graph, comp)
        steps = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
        problems.append(f"{len(comp)} modules {comp}: e.g. {steps}")
    assert not problems, "import cycles (module- or function-level imports):\n  " + "\n  ".join(problems)


def test_the_cycle_finder_finds_cycles_and_resolves_relative_imports():
    """The checks above cannot pass by finding nothing: a known graph, and relative imports resolved by hand."""
    g = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}, "e": {"e": 5}}
    comps = strongly_connected(g)
    assert comps == [["a", "b", "c"]]
    assert a_cycle(g, comps[0]) == ["a", "b", "c", "a"]
    node = ast.parse("from ..gating import ScoreSource").body[0]
    assert _resolve_from("shadowsparse.selectors.base", False, node) == "shadowsparse.gating"
    node = ast.parse("from .base import Run").body[0]
    assert _resolve_from("shadowsparse.selectors", True, node) == "shadowsparse.selectors.base"
    node = ast.parse("from . import esparse").body[0]
    assert _resolve_from("shadowsparse.prune.sparsify", False, node) == "shadowsparse.prune"
    known = {"shadowsparse.prune", "shadowsparse.prune.esparse"}
    path = ROOT / "shadowsparse" / "prune" / "sparsify.py"
    assert _imported("shadowsparse.prune.sparsify", path, node, known) == [("shadowsparse.prune", ""),
                                                                           ("shadowsparse.prune.esparse", "")]
    node = ast.parse("from . import squash_").body[0]
    assert _imported("shadowsparse.prune.sparsify", path, node, known) == [("shadowsparse.prune", "squash_")]
    graph = import_graph()
    assert "shadowsparse.arch" in graph["shadowsparse.gating"]  # the real graph has the edges it should


# -- (b) private names ------------------------------------------------------------------------------------------------

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, modules: dict[str, Path]) -> list[str]:
    """Imports in ``path`` of an underscore-prefixed name (or module) of a first-party module; dunders are public."""
    inside = ROOT in path.parents
    mod = _module_name(path) if inside else path.stem
    where, problems = path.relative_to(ROOT) if inside else path.name, []
    for node in _runtime_imports(_parse(path)):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                (node.module or "").split(".")[0] not in FIRST_PARTY:
            continue  # third-party internals are their business
        if isinstance(node, ast.Import) and all(a.name.split(".")[0] not in FIRST_PARTY for a in node.names):
            continue
        for target, name in _imported(mod, path, node, modules):
            if any(_private(p) for p in (name.split(".") if name else target.split("."))):
                problems.append(f"{where}:{node.lineno} imports {target}{'.' + name if name else ''}")
    return problems


def test_no_module_imports_another_modules_private_name():
    modules = _package_modules()
    files = _py_files(PACKAGE, "benchmark.py", "benchmarks", "tests", "train.py")
    problems = _syntax_errors(files)
    for path in files:
        problems += private_imports(path, modules)
    assert not problems, "private (underscore) names imported from another module:\n  " + "\n  ".join(problems)


def test_private_import_check_catches_what_it_should(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from __future__ import annotations\nfrom shadowsparse.gating import _device_of, n_keep\n"
                 "from torch.nn import _reduction\nimport os\nfrom shadowsparse import __version__\n"
                 "def f():\n    from shadowsparse.kernels.common import _private_helper\n")
    assert private_imports(f, _package_modules()) == ["m.py:2 imports shadowsparse.gating._device_of",
                                                      "m.py:7 imports shadowsparse.kernels.common._private_helper"]


# -- (c) function length ----------------------------------------------------------------------------------------------

def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function or method longer than ``limit`` (from its
    def line to its last line, docstring included, decorators not)."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = child.end_lineno - child.lineno + 1
                if length > limit:
                    out.append((prefix + child.name, child.lineno, length))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(_parse(path), "")
    return out


def test_no_function_longer_than_80_lines_outside_the_kernels():
    problems = _syntax_errors(_py_files(PACKAGE))
    for path in _py_files(PACKAGE):
        if (ROOT / PACKAGE / "kernels") in path.parents:
            continue
        problems += [f"{path.relative_to(ROOT)}:{line} {name}: {n} lines" for name, line, n in long_functions(path)]
    assert not problems, f"functions longer than {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(problems)


def test_long_function_finder_counts_methods_and_nested_functions(tmp_path):
    lines = ["class A:", "    def m(self):"] + [f"        x{i} = {i}" for i in range(80)]
    src = "\n".join(lines + ["", "def short():", "    return 1", ""])  # A.m: its def line + 80 = 81 lines
    f = tmp_path / "m.py"
    f.write_text(src)
    assert long_functions(f) == [("A.m", 2, 81)]
    assert long_functions(f, limit=81) == []


# -- (d) citations ----------------------------------------------------------------------------------------------------

# a repo path: one of the top-level folders that exist, then path characters; placeholders (<x>, {x}, *) are skipped
PATH_TOKEN = re.compile(r"(?<![\w./-])((?:shadowsparse|conf|docs|tests|benchmarks|scripts|research|notebooks)"
                        r"/[\w./*<>{}-]*)")
MODULE_TOKEN = re.compile(r"(?<![\w./-])(shadowsparse(?:\.\w+)+)")
OLD_DESIGN = re.compile(r"DESIGN\.md")  # the design notes are docs/design.md in this repository
# a config group choice on a command line (``experiment=opt13b``, ``-m predictor=shared,per_layer``), not a Python
# keyword argument (``sparsity=0.4``): the value starts with a letter and is not followed by a dot or a call
GROUP_CHOICE = re.compile(r"(?<![\w.+/-])\+?(experiment|bench|llm|data|sparsity|targets|predictor|gating|evaluate|"
                          r"trainer|logger|lte|paths)=([A-Za-z][\w,-]*)(?![\w.(])")


def _texts() -> list[tuple[str, int, str]]:
    """(file, line, text) of every piece of prose that may cite a file: the markdown docs, comments and string
    literals (docstrings, messages) of the Python sources, comments of the YAML configs, shell scripts, Makefile."""
    out: list[tuple[str, int, str]] = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        out += [(str(md.relative_to(ROOT)), i + 1, t) for i, t in enumerate(md.read_text().splitlines())]
    this = Path(__file__).resolve()
    for path in _py_files(PACKAGE, "tests", "benchmarks", "benchmark.py", "train.py", "research"):
        if path.resolve() == this:
            continue
        rel, src = str(path.relative_to(ROOT)), path.read_text()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                out.append((rel, tok.start[0], tok.string))
        tree = _parse(path)
        if rel.startswith("tests/"):  # tests feed bad names on purpose: their docstrings only, not their data
            strings = [n.body[0].value for n in ast.walk(tree) if isinstance(n, (
                ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(n, clean=False)]
        else:  # docstrings and messages: every string literal
            strings = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        for node in strings:
            out += [(rel, node.lineno + i, t) for i, t in enumerate(node.value.splitlines())]
    for cfg in [*sorted((ROOT / "conf").rglob("*.yaml")), *sorted((ROOT / "scripts").glob("*.sh")), ROOT / "Makefile"]:
        for i, t in enumerate(cfg.read_text().splitlines()):
            if "#" in t:
                out.append((str(cfg.relative_to(ROOT)), i + 1, t[t.index("#"):]))
    return out


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in _parse(path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def missing_module_reference(dotted: str, modules: dict[str, Path]) -> str | None:
    """``shadowsparse.a.b...``: each step a submodule, or a name defined at the top of the module before it (beyond
    a name, attributes are not checked). Returns the first step that names nothing, or None."""
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        prefix, name = ".".join(parts[:i]), parts[i]
        if f"{prefix}.{name}" in modules:
            continue
        return None if name in _top_level_names(modules[prefix]) else f"{prefix}.{name}"
    return None


def cited_problems(texts: list[tuple[str, int, str]]) -> list[str]:
    modules = _package_modules()
    problems = []
    for where, line, text in texts:
        at = f"{where}:{line}"
        for m in OLD_DESIGN.finditer(text):
            problems.append(f"{at}: cites DESIGN.md; the design notes are docs/design.md")
        for m in PATH_TOKEN.finditer(text):
            token = m.group(1).rstrip(".")
            if any(c in token for c in "*<>{}") or "..." in token:
                continue  # a pattern or placeholder, not one file
            if not (ROOT / token).exists():
                problems.append(f"{at}: cites {token}, which does not exist")
        for m in MODULE_TOKEN.finditer(text):
            missing = missing_module_reference(m.group(1), modules)
            if missing:
                problems.append(f"{at}: cites {m.group(1)}, but {missing} is neither a module nor a name in it")
        for m in GROUP_CHOICE.finditer(text):
            group, choices = m.group(1), m.group(2)
            folders = ["bench", "experiment"] if group == "experiment" else [group]
            for choice in choices.split(","):
                if choice and not any((ROOT / "conf" / f / f"{choice}.yaml").exists() for f in folders):
                    problems.append(f"{at}: {group}={choice}, but there is no conf/{folders[-1]}/{choice}.yaml")
    return problems


def test_docs_and_comments_cite_only_what_exists():
    problems = cited_problems(_texts())
    assert not problems, "citations of things that do not exist:\n  " + "\n  ".join(problems)


def test_citation_check_catches_what_it_should():
    texts = [("x.md", 1, "see DESIGN.md and docs/design.md"), ("x.md", 2, "in `shadowsparse/nothing_here.py`."),
             ("x.md", 3, "module shadowsparse.nm, or shadowsparse.gating.attach_gating"),
             ("x.md", 4, "python train.py experiment=h100 llm=hf"), ("x.md", 5, "conf/bench/<name>.yaml, docs/*.md")]
    problems = cited_problems(texts)
    assert len(problems) == 4, problems
    assert [p.split(":")[1] for p in problems] == ["1", "2", "3", "4"]
    assert "shadowsparse.nm" in problems[2] and "experiment=h100" in problems[3]
