"""The package's layout rules: one package per tool, no calls into another module's private names."""

from __future__ import annotations

import ast

from pipeline_deps import SRC, imports_of


def test_tracking_never_imports_tuning_or_optuna():
    for path in sorted((SRC / "pix2seq" / "tracking").glob("*.py")):
        names = imports_of(path)
        assert not [n for n in names if n.startswith("pix2seq.tuning")], path
        assert "optuna" not in path.read_text().split("import"), path


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for path in sorted((SRC / "pix2seq").rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> pix2seq module it binds
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pix2seq"):
                offenders += [
                    f"{path}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
                aliases.update({a.asname or a.name: node.module for a in node.names})
            elif isinstance(node, ast.Import):
                aliases.update(
                    {
                        (a.asname or a.name).split(".")[0]: a.name
                        for a in node.names
                        if a.name.startswith("pix2seq")
                    }
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                offenders.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offenders, "\n".join(offenders)
