"""The set-up scripts' promises that a warm machine would hide (issue: a test read a component
that only another test had started)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _default_components() -> set[str]:
    text = (ROOT / "scripts" / "infra").read_text()
    match = re.search(r'^readonly DEFAULT_COMPONENTS="([^"]*)"', text, re.MULTILINE)
    assert match, "scripts/infra defines no DEFAULT_COMPONENTS"
    return set(match.group(1).split())


def _components_tests_start() -> dict[str, set[str]]:
    """Every component named in an ``infra(...)`` call of a test module, by module."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "infra":
                names = {a.value for a in node.args if isinstance(a, ast.Constant)}
                found.setdefault(str(path.relative_to(ROOT)), set()).update(names)
    return found


def test_the_test_command_brings_up_every_component_a_test_uses() -> None:
    """scripts/test runs `scripts/infra up` with no arguments before pytest: what a test starts
    mid-session must be in that set, or a fresh machine sees it missing until some test starts it."""
    defaults = _default_components()
    missing = {module: sorted(names - defaults) for module, names in _components_tests_start().items()
               if names - defaults}
    assert missing == {}


def test_the_scan_finds_the_infra_calls() -> None:
    """The guard above passes vacuously if the scan finds nothing: it must see the known users."""
    found = _components_tests_start()
    assert "dev-base-image" in found["tests/test_runtime_kubernetes.py"]
    assert "postgres" in found["tests/conftest.py"]


def test_the_test_command_starts_the_services_before_pytest() -> None:
    lines = [line.strip() for line in (ROOT / "scripts" / "test").read_text().splitlines()]
    assert lines.index("scripts/infra up") < next(i for i, line in enumerate(lines) if "pytest" in line
                                                  and not line.startswith("#"))
