"""Which eps sources a stage runs, read from the imports, and their hash.

Each rule gets the hash of the modules its command runs as a parameter, so an edit to any of
them reruns the stage. The list is derived, not written by hand: from the rule's entry modules,
every `eps` module they import (at module level or inside a function) is followed, and a
package's `__init__.py` counts with each of its modules (Python runs it first). Imports by a
computed name (`importlib.import_module`) are not seen: name those modules as entries.
Standard library only: the workflow imports this before anything is installed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path


@functools.lru_cache(maxsize=None)
def imported_modules(source: Path, package: str = "eps") -> frozenset[str]:
    """Dotted names of the `package` modules `source` imports, anywhere in the file (read once)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)  # `from eps.models import efficientnet` may name a module
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(n for n in names if n == package or n.startswith(package + "."))


def module_file(root: Path, name: str) -> Path | None:
    """The file of dotted module `name` under `root` (a module or a package), if any."""
    rel = Path(*name.split("."))
    for candidate in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def code_closure(root, *entries, shallow=()) -> list[Path]:
    """Every source file the entries (files or folders, relative to `root`) run, sorted.

    Files in `shallow` count as themselves, their imports not followed: the command-line
    dispatcher imports every stage, but runs only the one a rule calls.
    """
    root = Path(root)
    shallow = {root / rel for rel in shallow}
    todo: list[Path] = []
    for rel in entries:
        target = root / rel
        if not target.exists():
            raise FileNotFoundError(f"{target}: a stage's code entry does not exist")
        todo += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        names = set() if path in shallow else set(imported_modules(path))
        parts = path.relative_to(root).with_suffix("").parts
        names.update(".".join(parts[:k]) for k in range(1, len(parts)))  # the packages above it
        for name in names:
            found = module_file(root, name)
            if found is not None and found not in seen:
                todo.append(found)
    return sorted(seen)


def code_hash(root, *entries, shallow=()) -> str:
    """Hash of the names and contents of `code_closure(root, *entries, shallow=...)` (16 hex digits)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in code_closure(root, *entries, shallow=shallow):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
