"""What each DVC stage reads: the source files (a static import closure) and the expansion of
``dvc.yaml``'s ``params:`` and ``deps:`` entries. Used by tests/test_pipeline.py."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# the pix2seq command each DVC stage runs (`bin/pix2seq <command>`)
COMMANDS = {
    "download": "download",
    "prepare": "prepare",
    "train": "train",
    "evaluate": "eval",
    "tune": "tune",
}
# the function each stage runs (pix2seq.cli.stages calls them)
STAGE_MODULES = {
    "download": "pix2seq.data.download",
    "prepare": "pix2seq.data.prepare",
    "train": "pix2seq.training",
    "evaluate": "pix2seq.evaluation.report",
    "tune": "pix2seq.tuning",
}
# modules that change how a stage runs or where it reports, never what it writes (like the RUNTIME
# config keys): the command line, MLflow, the served model, error formatting, the torchrun relaunch,
# the version string. A stage's deps leave them out, so editing them re-runs nothing.
RUNTIME_MODULES = ("pix2seq", "pix2seq.cli", "pix2seq.tracking", "pix2seq.serving", "pix2seq.pyfunc_entry",
                   "pix2seq.errors", "pix2seq.launch")  # fmt: skip


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _is_runtime(name: str) -> bool:
    return any(name == r or (r != "pix2seq" and name.startswith(r + ".")) for r in RUNTIME_MODULES)


def imports_of(path: Path) -> set[str]:
    """pix2seq modules ``path`` imports (module level or inside functions; not under TYPE_CHECKING)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pix2seq"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pix2seq"):
            out.add(node.module)
            out.update(
                f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if module_file(m)}


def _trivial(path: Path) -> bool:
    """A package ``__init__.py`` with nothing but a docstring."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, ast.Expr) for n in body)


def source_closure(entry: str) -> set[str]:
    """Repository-relative paths of the source files running ``entry`` can execute (its import
    closure with the parent packages' ``__init__``), runtime modules and empty packages left out."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            mod = ".".join(parts[:i])
            if mod not in seen and not _is_runtime(mod):
                seen.add(mod)
                todo.extend(imports_of(module_file(mod)))
    files = {module_file(m) for m in seen}
    return {str(f.relative_to(REPO)) for f in files if not _trivial(f)}


def declared_sources(deps: list[str]) -> set[str]:
    """The ``.py`` files a stage's ``deps:`` entries under ``src/`` cover (folders expanded)."""
    out: set[str] = set()
    for d in deps:
        p = REPO / d
        if not d.startswith("src/"):
            continue
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        out.update(str(f.relative_to(REPO)) for f in files if not _trivial(f))
    return out


def expand_params(entries: list, known: list[str]) -> set[str]:
    """``dvc.yaml`` ``params:`` entries (keys or whole sections) -> the dotted keys they cover."""
    out: set[str] = set()
    for e in entries:
        names = [e] if isinstance(e, str) else [k for v in e.values() for k in v]
        for n in names:
            covered = [k for k in known if k == n or k.startswith(n + ".")]
            out.update(covered or [n])
    return out
