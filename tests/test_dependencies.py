"""Every third-party module the package imports is a dependency pyproject declares: a plain import
among `dependencies`, one guarded by `except ImportError` in an optional extra. The dev extras
(transformers, ...) bring more packages into the test environment than a user has, so a missing
declaration shows only here, or in CI's install without extras."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "gpt2lab"


def distribution(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {distribution(r) for r in project["dependencies"]}
    optional = {distribution(r) for extra in project["optional-dependencies"].values() for r in extra}
    return required, optional


def _catches_import_error(node: ast.Try) -> bool:
    names = []
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names += [kind.id for kind in kinds if isinstance(kind, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


def third_party_imports(source: str) -> list[tuple[str, int, bool]]:
    """(top-level module, line, guarded by `except ImportError`) of each import in `source`."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], node.lineno, guarded) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, guarded))
        inner = guarded or (isinstance(node, ast.Try) and _catches_import_error(node))
        for child in ast.iter_child_nodes(node):
            # A handler's own imports are not guarded by it.
            visit(child, guarded if isinstance(child, ast.ExceptHandler) else inner)

    visit(ast.parse(source), False)
    return [item for item in found if item[0] not in sys.stdlib_module_names and item[0] != "gpt2lab"]


def undeclared(sources: dict[str, str], required: set[str], optional: set[str]) -> list[str]:
    providers = metadata.packages_distributions()
    problems = []
    for where, source in sorted(sources.items()):
        for module, line, guarded in third_party_imports(source):
            names = {distribution(d) for d in providers.get(module, [])}
            allowed = required | optional if guarded else required
            if not names and guarded:
                names = {distribution(module)}  # an extra this environment lacks: named as imported
            if not names:
                problems.append(f"{where}:{line} imports {module}, which no installed distribution provides")
            elif not names & allowed:
                kind = "an optional extra" if guarded else "dependencies"
                problems.append(f"{where}:{line} imports {module} ({', '.join(sorted(names))}), not in {kind}")
    return problems


def package_sources() -> dict[str, str]:
    return {str(path.relative_to(ROOT)): path.read_text() for path in PACKAGE.rglob("*.py")}


def test_every_import_of_the_package_is_a_declared_dependency():
    required, optional = declared()
    problems = undeclared(package_sources(), required, optional)
    assert not problems, "declare these in pyproject.toml:\n" + "\n".join(problems)


def test_the_check_names_an_undeclared_import():
    required, optional = declared()
    source = "import tokenizers\ntry:\n    import wandb\nexcept ImportError:\n    wandb = None\n"
    assert third_party_imports(source) == [("tokenizers", 1, False), ("wandb", 3, True)]
    assert undeclared({"m.py": source}, required - {"tokenizers"}, optional) == [
        "m.py:1 imports tokenizers (tokenizers), not in dependencies"
    ]
    # An optional extra's package imported without a guard would crash a user without the extra.
    assert undeclared({"m.py": "import pydantic\n"}, required - {"pydantic"}, optional | {"pydantic"}) == [
        "m.py:1 imports pydantic (pydantic), not in dependencies"
    ]
