"""The layout of daemon/: what runs inside a sandbox (daemon/sandbox/) reaches nothing of the
daemon but the protocol and the kernel wrappers (daemon/linux/), by every import it makes,
at the top of a module or inside a function, followed to the end."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every daemon module `path` imports, anywhere in it (a package counts with its module)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "daemon" and _module_file(n))
    return found


def closure(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        assert path is not None, name
        todo.extend(_imports(path, name) - seen)
    return seen


def _allowed(name: str) -> bool:
    return name in ("daemon", "daemon.protocol") or name.startswith(
        ("daemon.sandbox", "daemon.linux")
    )


def test_what_runs_inside_a_sandbox_imports_only_the_protocol_and_the_kernel_wrappers() -> None:
    for module in sorted(p.stem for p in (ROOT / "daemon" / "sandbox").glob("*.py")):
        reached = closure(f"daemon.sandbox.{module}")
        assert {n for n in reached if not _allowed(n)} == set(), module


def test_the_kernel_wrappers_the_sandbox_side_uses_import_nothing_of_the_daemon() -> None:
    reached = set().union(
        *(closure(f"daemon.sandbox.{p.stem}") for p in (ROOT / "daemon" / "sandbox").glob("*.py"))
    )
    linux = {n for n in reached if n.startswith("daemon.linux.")}
    assert linux, "the sandbox side uses no kernel wrapper?"
    for name in linux:
        assert closure(name) <= {n for n in reached if _allowed(n)}, name


def test_the_zygote_loads_no_daemon_module_beyond_its_closure() -> None:
    """The same, by importing: what `python -m daemon.sandbox.zygote` has in sys.modules."""
    code = (
        "import sys, daemon.sandbox.zygote as z; "
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('daemon'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert [m for m in out if not _allowed(m)] == []
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, daemon.sandbox.zygote; "
         "print(' '.join(m for m in ('pydantic', 'sqlalchemy', 'fastapi', 'tomllib', 'structlog')"
         " if m in sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert heavy == []


def test_the_http_face_is_only_in_api() -> None:
    """daemon/ never imports api/ (the HTTP face sits on top of the daemon, not inside it)."""
    for path in (ROOT / "daemon").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "api":
                raise AssertionError(f"{path} imports {node.module}")
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "api" for a in node.names), path
