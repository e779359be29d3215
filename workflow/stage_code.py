"""Which eps sources a stage runs, read from the imports, and their hash.

Each rule gets the hash of the modules its command runs as a parameter, so an edit to any of
them reruns the stage. The list is derived, not written by hand: from the rule's entry modules,
every `eps` module they import (at module level or inside a function) is followed, and a
package's `__init__.py` counts with each of its modules (Python runs it first; of a package
only imported that way, the imports inside its functions are not followed). Imports by a
computed name (`importlib.import_module`) are not seen: name those modules as entries.
Standard library only: the workflow imports this before anything is installed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path


def _module_level(tree: ast.Module):
    """The nodes that run when the module is imported: all but the bodies of functions."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


@functools.lru_cache(maxsize=None)
def imported_modules(source: Path, package: str = "eps", anywhere: bool = True) -> frozenset[str]:
    """Dotted names of the `package` modules `source` imports: anywhere in the file, or
    (`anywhere=False`) only where importing the file runs them (not inside functions)."""
    names: set[str] = set()
    tree = ast.parse(source.read_text(), str(source))
    for node in (ast.walk(tree) if anywhere else _module_level(tree)):
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

    Entries in `shallow` count as themselves, their imports not followed (the command-line
    dispatcher imports every stage but runs one; the helpers every command loads hash their
    own text), unless a stage module imports them, which follows them as any other.
    """
    root = Path(root)
    shallow = {root / rel for rel in shallow}
    SELF, MODULE_LEVEL, FULL = 0, 1, 2  # how much of a file runs: nothing of its imports, its import, all
    todo: list[tuple[Path, int]] = []
    for rel in entries:
        target = root / rel
        if not target.exists():
            raise FileNotFoundError(f"{target}: a stage's code entry does not exist")
        for path in (sorted(target.rglob("*.py")) if target.is_dir() else [target]):
            todo.append((path, SELF if path in shallow else FULL))
    # a module a stage imports by name is called (FULL); a package above a module is only
    # imported (Python runs its module level, not its functions)
    seen: dict[Path, int] = {}
    while todo:
        path, mode = todo.pop()
        if seen.get(path, -1) >= mode:
            continue
        seen[path] = mode
        names = set(imported_modules(path, anywhere=mode == FULL)) if mode > SELF else set()
        for name in names:
            found = module_file(root, name)
            if found is not None:
                todo.append((found, FULL))
        parts = path.relative_to(root).with_suffix("").parts
        for k in range(1, len(parts)):
            found = module_file(root, ".".join(parts[:k]))
            if found is not None and found != path:
                todo.append((found, MODULE_LEVEL))
    return sorted(seen)


def code_hash(root, *entries, shallow=()) -> str:
    """Hash of the names and contents of `code_closure(root, *entries, shallow=...)` (16 hex digits)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in code_closure(root, *entries, shallow=shallow):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
