"""The house rules that a grep can check: import direction and which module may talk to which library."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((REPO / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_nothing_above_it(path):
    found = imports(path)
    assert not found & {"ablations", "studies", "optuna"}, found
    if path.name != "tracking.py":
        assert "mlflow" not in found


@pytest.mark.parametrize("path", sorted((REPO / "ablations").glob("*.py")), ids=lambda p: p.name)
def test_ablations_do_not_import_studies_or_trackers(path):
    assert not imports(path) & {"studies", "mlflow", "optuna"}


@pytest.mark.parametrize("path", sorted(REPO.glob("[cas]*/*.py")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 400
