"""The public API: lazy, complete, and the library below the CLI neither parses arguments nor prints."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mcloss

PACKAGE = Path(mcloss.__file__).resolve().parent


def test_import_is_lazy_and_every_public_name_resolves():
    code = "import sys, mcloss; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in mcloss.__all__:
        assert getattr(mcloss, name) is not None, name
    __import__("mcloss.explainability.explanation")  # importing a submodule must not shadow mcloss.explain
    assert callable(mcloss.explain) and mcloss.explain.__module__ == "mcloss.explainability.explanation"
    assert mcloss.train.__module__ == "mcloss.training.loop" and callable(mcloss.evaluate)


def test_only_the_cli_parses_arguments_or_prints():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                offenders.append(f"{rel}:{node.lineno} imports argparse")
            if isinstance(node, ast.ImportFrom) and node.module == "argparse":
                offenders.append(f"{rel}:{node.lineno} imports argparse")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{rel}:{node.lineno} prints")
    assert offenders == []
