"""The package's modules import each other without a circle (a circle is what function-level imports hide)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mbti_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mbti_lightning"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {name for name in names if name in modules} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
    return found & modules


def test_no_module_imports_itself_through_others():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports(path, set(files)) - {name} for name, path in files.items()}
    # The package's __init__ files re-export their modules: an edge into a package is an edge into them all.
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(name) :], name]))
        if name in done:
            return
        stack.append(name)
        for other in sorted(graph[name]):
            if not (name.startswith(other + ".") or other.startswith(name + ".")):  # a package and its own modules
                visit(other)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
