"""The repository's import layering, checked statically (every .py file parsed with `ast`, nothing imported).

    data  <-  pipeline library  <-  pipeline.stages  <-  pipeline.api / pipeline.demo  <-  pipeline.fit (CLI)
                     ^                    |
                 callbacks  <-------------'  (the stages attach callbacks; callbacks only observe the library)

    benchmarks/, scripts/  ->  pipeline.api (and the library), never pipeline.stages or pipeline.fit

`data` is the bottom layer and knows nothing of `pipeline` or `callbacks`. The library (everything under
pipeline/ except stages/, fit.py, api.py, demo.py) never reaches up into the stages, the CLI or the callbacks.
A stage module never imports another stage module: stages compose only in pipeline.demo. A project-internal import
nested in a function or class body says, in a comment on its line or the line above, why it is lazy (tests are
exempt). callbacks/*.py hold Lightning Callback subclasses and private (`_`-prefixed) helpers only.

`violations(root)` does the checking; each rule has its own test, and `test_checker_reports_every_rule` runs the
checker on a small fake tree that breaks every rule once, so that none of the tests can pass vacuously.
"""
from __future__ import annotations

import ast
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

INTERNAL = ("pipeline", "data", "callbacks")  # top-level packages of this project
ENTRY = ("pipeline.stages", "pipeline.fit", "pipeline.api", "pipeline.demo")  # the layers above the library
SKIP_DIRS = {"__pycache__", "runs", "checkpoints", "build", "dist", "node_modules", "lightning_logs"}
LAZY_CHECKED = ("pipeline", "data", "callbacks", "benchmarks", "scripts")  # top-level folders rule f covers
LIGHTNING = ("lightning", "pytorch_lightning")
# comments that are tool pragmas, not a reason for laziness
PRAGMA = re.compile(r"^(noqa\b(:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*)?|type:\s*ignore(\[[^\]]*\])?|"
                    r"pragma:\s*no\s*cover|fmt:\s*\w+|isort:\s*\w+)\s*")

RULES = {
    "syntax": "every .py file parses",
    "a": "data/ imports nothing from pipeline or callbacks",
    "b": "a pipeline/stages/ module imports no other pipeline/stages/ module",
    "c": "the pipeline library imports nothing from pipeline.stages/fit/api/demo or callbacks",
    "d": "callbacks/ import nothing from pipeline.stages/fit/api/demo",
    "e": "benchmarks/ and scripts/ import nothing from pipeline.stages or pipeline.fit (use pipeline.api)",
    "f": "a project-internal import inside a function or class body has a comment saying why it is lazy",
    "g": "callbacks/*.py define only Lightning Callback subclasses and _private helpers",
}


@dataclass(frozen=True, order=True)
class Violation:
    rule: str
    path: str  # relative to the root, with /
    line: int
    what: str  # the offending statement or definition

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def python_files(root: Path) -> list[Path]:
    """Every .py file of the repository, skipping hidden folders and run outputs."""
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts[:-1]
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        out.append(path)
    return out


def _module_name(rel: Path) -> tuple[str, bool]:
    """Dotted module name of a file and whether it is a package's __init__."""
    parts = list(rel.with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _targets(root: Path, node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    """The modules an import statement loads: `from a import b` is `a.b` where that is a module of the tree,
    otherwise `a`; relative imports are resolved against the file's package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_pkg else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        base = ".".join([*package, *([node.module] if node.module else [])])
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        out.append(sub if alias.name != "*" and _is_module(root, sub) else base)
    return list(dict.fromkeys(out))


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line (pragmas stripped; only lines whose comment says something) and the comment-only lines."""
    text, alone = {}, set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            words = PRAGMA.sub("", tok.string.lstrip("#").strip())
            if re.search(r"[A-Za-z]", words):
                text[tok.start[0]] = words
            if not tok.line[: tok.start[1]].strip():
                alone.add(tok.start[0])
    except (tokenize.TokenError, SyntaxError):
        pass
    return text, alone


def _statement(source: str, node: ast.AST) -> str:
    return " ".join((ast.get_source_segment(source, node) or "").split())


def _nested_imports(tree: ast.Module):
    """Import statements inside a function or class body, at any depth."""
    def walk(node, nested):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and nested:
                yield child
            yield from walk(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                ast.ClassDef, ast.Lambda)))
    yield from walk(tree, False)


def _top_level_imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, for the module-level imports (to resolve a class's bases)."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    names[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        inner = _dotted(expr.value)
        return f"{inner}.{expr.attr}" if inner else None
    if isinstance(expr, ast.Subscript):  # Generic[...] and the like
        return _dotted(expr.value)
    return None


def _is_callback_base(expr: ast.expr, imports: dict[str, str], local_callbacks: set[str]) -> bool:
    name = _dotted(expr)
    if name is None:
        return False
    head, _, rest = name.partition(".")
    if not rest and head in local_callbacks:
        return True
    origin = imports.get(head, head) + (f".{rest}" if rest else "")
    if _under(origin, ("callbacks",)):  # a public class of callbacks/ is a Callback (this very rule)
        return True
    return _under(origin, LIGHTNING) and (origin.endswith(".Callback") or ".callbacks." in origin)


def _check_callbacks_module(tree: ast.Module, rel: str, source: str) -> list[Violation]:
    imports, callbacks, out = _top_level_imports(tree), set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            out.append(Violation("g", rel, node.lineno, f"public function {node.name}()"))
        elif isinstance(node, ast.ClassDef):
            if any(_is_callback_base(b, imports, callbacks) for b in node.bases):
                callbacks.add(node.name)
            elif not node.name.startswith("_"):
                bases = ", ".join(_statement(source, b) for b in node.bases) or "object"
                out.append(Violation("g", rel, node.lineno, f"class {node.name}({bases}) is not a Lightning Callback"))
    return out


def violations(root: Path) -> list[Violation]:
    """Every breach of the layering rules (see RULES) in the .py files under `root`."""
    root = Path(root)
    out: list[Violation] = []
    for path in python_files(root):
        rel_path = path.relative_to(root)
        rel = rel_path.as_posix()
        top = rel_path.parts[0] if len(rel_path.parts) > 1 else ""
        module, is_pkg = _module_name(rel_path)
        source = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source, filename=rel)
        except SyntaxError as e:
            out.append(Violation("syntax", rel, e.lineno or 0, f"does not parse: {e.msg}"))
            continue

        in_stages = _under(module, ("pipeline.stages",))
        library = top == "pipeline" and not in_stages and not _under(module, ENTRY[1:])
        comments, alone = _comments(source)
        nested = {id(n) for n in _nested_imports(tree)}

        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _targets(root, node, module, is_pkg)
            what = _statement(source, node)

            def report(rule, bad, node=node, what=what):
                if any(bad(t) for t in targets):
                    out.append(Violation(rule, rel, node.lineno, what))

            if top == "data":
                report("a", lambda t: _under(t, ("pipeline", "callbacks")))
            if in_stages:
                report("b", lambda t: _under(t, ("pipeline.stages",)) and t != module)
            if library:
                report("c", lambda t: _under(t, (*ENTRY, "callbacks")))
            if top == "callbacks":
                report("d", lambda t: _under(t, ENTRY))
            if top in ("benchmarks", "scripts"):
                report("e", lambda t: _under(t, ("pipeline.stages", "pipeline.fit")))
            if top in LAZY_CHECKED and id(node) in nested and any(_under(t, INTERNAL) for t in targets):
                lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                said = any(n in comments for n in lines) or (node.lineno - 1 in comments and node.lineno - 1 in alone)
                if not said:
                    out.append(Violation("f", rel, node.lineno, what + "  (lazy, and no comment says why)"))

        if top == "callbacks":
            out.extend(_check_callbacks_module(tree, rel, source))
    return sorted(out)


@pytest.fixture(scope="module")
def repo_violations() -> list[Violation]:
    return violations(ROOT)


def _assert_rule(found: list[Violation], rule: str) -> None:
    bad = [v for v in found if v.rule == rule]
    if bad:
        pytest.fail(f"rule {rule} ({RULES[rule]}) is broken {len(bad)} time(s):\n" + "\n".join(f"  {v}" for v in bad),
                    pytrace=False)


def test_checker_sees_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p in python_files(ROOT)}
    for expected in ("data/__init__.py", "pipeline/models.py", "pipeline/fit.py", "pipeline/api.py",
                     "callbacks/__init__.py", "tests/test_layout.py"):
        assert expected in files, f"{expected} was not scanned"
    assert any(f.startswith("pipeline/stages/") and not f.endswith("__init__.py") for f in files)


def test_every_file_parses(repo_violations):
    _assert_rule(repo_violations, "syntax")


def test_data_imports_no_pipeline_or_callbacks(repo_violations):
    _assert_rule(repo_violations, "a")


def test_stages_do_not_import_each_other(repo_violations):
    _assert_rule(repo_violations, "b")


def test_library_imports_no_stages_cli_api_demo_or_callbacks(repo_violations):
    _assert_rule(repo_violations, "c")


def test_callbacks_import_no_stages_cli_api_or_demo(repo_violations):
    _assert_rule(repo_violations, "d")


def test_benchmarks_and_scripts_import_no_stages_or_cli(repo_violations):
    _assert_rule(repo_violations, "e")


def test_lazy_internal_imports_say_why(repo_violations):
    _assert_rule(repo_violations, "f")


def test_callbacks_define_only_callbacks(repo_violations):
    _assert_rule(repo_violations, "g")


FAKE_TREE = {
    "data/__init__.py": "",
    "data/bad.py": """
        import callbacks.cb
        from pipeline.models import thing
        from data import other
        """,
    "data/other.py": "",
    "pipeline/__init__.py": "",
    "pipeline/models.py": """
        from data.other import x
        from pipeline import sampling
        def lazy():
            from pipeline.sampling import y  # lazy: import cycle pipeline.models <-> pipeline.sampling
            # lazy: the same cycle, said on the line above
            from pipeline.sampling import z
            import torch
        """,
    "pipeline/sampling.py": """
        from pipeline.stages.one import z
        from pipeline import fit
        from callbacks.cb import CB
        from .api import q
        from pipeline.quant import inner
        """,
    "pipeline/quant/__init__.py": "",
    "pipeline/quant/inner.py": """
        from .. import demo
        from ..models import thing
        """,
    "pipeline/stages/__init__.py": "",
    "pipeline/stages/one.py": """
        from pipeline.stages.two import y
        from . import two
        from pipeline.models import thing
        """,
    "pipeline/stages/two.py": "from callbacks.cb import CB\n",
    "pipeline/fit.py": "from pipeline.stages import one\n",
    "pipeline/api.py": "from pipeline.stages.one import x\n",
    "pipeline/demo.py": "from pipeline.stages.two import y\n",
    "callbacks/__init__.py": "",
    "callbacks/cb.py": """
        import lightning as L
        from lightning.pytorch.callbacks import ModelCheckpoint
        from pipeline.api import calibrate
        from pipeline.models import thing
        class CB(L.Callback):
            pass
        class Sub(CB):
            pass
        class Ckpt(ModelCheckpoint):
            pass
        class _Helper:
            pass
        class Table:
            pass
        def _private():
            pass
        def helper():
            pass
        """,
    "benchmarks/b.py": """
        from pipeline.stages.one import x
        from pipeline.fit import main
        from pipeline.api import calibrate
        def run():
            from pipeline.models import thing  # noqa: E402
            from data.other import x
            from pipeline.models import (  # lazy: keeps --help fast
                thing)
        """,
    "scripts/s.py": """
        import pipeline.stages.two
        class Job:
            def go(self):
                from callbacks.cb import CB
        """,
    "tests/test_x.py": """
        def test_it():
            from pipeline.stages.one import x
        """,
    "pipeline/broken.py": "def (:\n",
}

EXPECTED = {
    ("a", "data/bad.py", 1), ("a", "data/bad.py", 2),
    ("b", "pipeline/stages/one.py", 1), ("b", "pipeline/stages/one.py", 2),
    ("c", "pipeline/sampling.py", 1), ("c", "pipeline/sampling.py", 2), ("c", "pipeline/sampling.py", 3),
    ("c", "pipeline/sampling.py", 4), ("c", "pipeline/quant/inner.py", 1),
    ("d", "callbacks/cb.py", 3),
    ("e", "benchmarks/b.py", 1), ("e", "benchmarks/b.py", 2), ("e", "scripts/s.py", 1),
    ("f", "benchmarks/b.py", 5), ("f", "benchmarks/b.py", 6), ("f", "scripts/s.py", 4),
    ("g", "callbacks/cb.py", 13), ("g", "callbacks/cb.py", 17),
    ("syntax", "pipeline/broken.py", 1),
}


def test_checker_reports_every_rule(tmp_path):
    for rel, text in FAKE_TREE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    found = violations(tmp_path)
    got = {(v.rule, v.path, v.line) for v in found}
    assert got == EXPECTED, (f"missing: {sorted(EXPECTED - got)}\nunexpected: {sorted(got - EXPECTED)}\n"
                             + "\n".join(f"  [{v.rule}] {v}" for v in found))
    assert {rule for rule, _, _ in got} == set(RULES)
    for rule in RULES:  # and the failure message names file, line and statement
        with pytest.raises(pytest.fail.Exception, match=rf"rule {rule} .*\n  \S+\.py:\d+: "):
            _assert_rule(found, rule)
