"""The house rules that a parser can check: import direction, which module may talk to which library, how the
commands in studies/ meet, and that no import cycle exists anywhere.

studies/ has two floors. Below: the shared modules (studies/cli.py, lr_handoff.py, mlflow_view.py), which import
no command. Above: the command packages run/, report/, search/ and bench/, each with its CLI in __main__.py.
- No module imports a command's CLI (a `__main__` module).
- A command reaches another command only through that package's front door, the names its `__init__.py` exports
  (`from studies.report import write_report`, `studies.search.choose_lr`), never one of its modules.
- studies/report reads only the tracking store: from core it imports `core.tracking`, `core.errors`, `core.config`
  (the defaults its setup table compares with) and `core.records` (the names of what a run records); besides
  those, the ablation registry (rationales), studies.cli, studies.mlflow_view and studies.verdict (the
  statistics, pure functions of numbers). It never imports torch, Optuna or MLflow itself.
- Only studies/search imports optuna; only core/tracking.py imports mlflow.
- What a run records is named only in core/records.py: no other module spells a metric key, a tag of the run
  vocabulary or an outcome name as a string literal (docstrings excepted).
Every import counts, at module level, inside a function or under TYPE_CHECKING alike.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "ablations", "studies")
COMMANDS = ("run", "report", "search", "bench")
REPORT_MAY_IMPORT = {"core.tracking", "core.errors", "core.config", "core.records", "ablations", "studies.cli",
                     "studies.mlflow_view", "studies.verdict"}
REPORT_MAY_IMPORT_NAMES: dict[str, set[str]] = {}  # module -> the only names report may take from it


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


MODULES = {module_name(p): p for p in project_files()}


def import_records(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(absolute module, names taken from it) for every import in the file; `import a.b` takes no names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    records = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            records += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            records.append((base, tuple(a.name for a in node.names)))
    return records


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports: `from pkg import mod` is an import of pkg.mod, else of pkg itself."""
    found = set()
    for module, names in import_records(path):
        subs = {f"{module}.{n}" for n in names} & MODULES.keys()
        found |= subs
        if module in MODULES and (not names or len(subs) < len(names)):
            found.add(module)
    return found


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", sorted((REPO / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_nothing_above_it(path):
    found = imports(path)
    assert not found & {"ablations", "studies", "optuna"}, found
    if path.name != "tracking.py":
        assert "mlflow" not in found


@pytest.mark.parametrize("path", sorted((REPO / "ablations").glob("*.py")), ids=lambda p: p.name)
def test_ablations_do_not_import_studies_or_trackers(path):
    assert not imports(path) & {"studies", "mlflow", "optuna"}


@pytest.mark.parametrize("path", project_files(), ids=rel)
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 400


@pytest.mark.parametrize("path", project_files(), ids=rel)
def test_only_search_imports_optuna_and_only_tracking_imports_mlflow(path):
    found = imports(path)
    if "optuna" in found:
        assert path.parent == REPO / "studies" / "search", f"{rel(path)} imports optuna; only studies/search may"
    if "mlflow" in found:
        assert path == REPO / "core" / "tracking.py", f"{rel(path)} imports mlflow; only core/tracking.py may"


@pytest.mark.parametrize("path", project_files(), ids=rel)
def test_no_module_imports_a_command_line(path):
    clis = sorted(m for m in project_imports(path) if m.endswith(".__main__"))
    assert not clis, f"{rel(path)} imports the command line {', '.join(clis)}; move what it needs down a floor"


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.py")), ids=rel)
def test_shared_studies_modules_import_no_command(path):
    above = sorted(m for m in project_imports(path) if m.split(".")[:2] in [["studies", c] for c in COMMANDS])
    assert not above, f"{rel(path)} is shared by the commands but imports {', '.join(above)}"


@pytest.mark.parametrize("path", [p for c in COMMANDS for p in sorted((REPO / "studies" / c).rglob("*.py"))], ids=rel)
def test_commands_meet_only_at_front_doors(path):
    own = path.relative_to(REPO / "studies").parts[0]
    for module in project_imports(path):
        parts = module.split(".")
        if parts[0] == "studies" and len(parts) > 2 and parts[1] in COMMANDS and parts[1] != own:
            pytest.fail(f"{rel(path)} imports {module}: command '{own}' may use '{parts[1]}' only through "
                        f"studies.{parts[1]}'s exports")


@pytest.mark.parametrize("path", sorted((REPO / "studies" / "report").rglob("*.py")), ids=rel)
def test_report_reads_only_the_tracking_store(path):
    heavy = sorted(imports(path) & {"torch", "torchvision", "optuna", "mlflow"})
    assert not heavy, f"{rel(path)} imports {', '.join(heavy)}; the report reads only the store"
    for module in project_imports(path):
        if module.startswith("studies.report") or module in REPORT_MAY_IMPORT:
            continue
        assert module in REPORT_MAY_IMPORT_NAMES, f"{rel(path)} imports {module}; the report reads only the store"
    for module, names in import_records(path):
        allowed = REPORT_MAY_IMPORT_NAMES.get(module)
        assert allowed is None or (names and set(names) <= allowed), f"{rel(path)} takes {names or module} from {module}"


def test_no_import_cycles():
    graph = {name: project_imports(path) - {name} for name, path in MODULES.items()}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


# ---- one vocabulary for what a run records ---------------------------------------------------------------------
VOCABULARY = REPO / "core" / "records.py"
METRIC_KEY = re.compile(r"^(fid|kid|loss|d|perf|progress|search|pr|dc)/[a-z0-9_]*$")  # 'fid/final', 'fid/' of f"fid/{n}"
KEY_INSIDE = re.compile(r"\b(fid|kid)/(final|best|final_std)\b|\b(loss|perf|progress)/[a-z_]+")
KEY_TAIL = re.compile(r"^/(final|best|final_std|feature_spread|nn_ratio|final_\w+)$")  # the constant part of f"{family}/final"
RUN_TAGS = {"diverged_at_nimg", "saturation_episodes", "_at_nimg", "fid_protocol."}
TAG_COLUMN = re.compile(r"^tags\.(outcome|variant|seed|study|study_key|ablation|preset|variants|seeds)$")  # a frame's


def vocabulary_literals(path: Path) -> list[str]:
    """String literals of a module (f-string parts included, docstrings and bare string statements not) that name
    a metric key, a run tag or an outcome."""
    from core.records import Outcome, TrialState
    words = {o.value for o in Outcome} | {s.value for s in TrialState} | RUN_TAGS
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
            if (text in words or METRIC_KEY.match(text) or KEY_TAIL.match(text) or KEY_INSIDE.search(text)
                    or TAG_COLUMN.match(text)):
                found.append(f"line {node.lineno}: {text!r}")
    return found


@pytest.mark.parametrize("path", [p for p in project_files() if p != VOCABULARY], ids=rel)
def test_what_a_run_records_is_named_only_in_the_vocabulary(path):
    found = vocabulary_literals(path)
    assert not found, f"{rel(path)} spells what a run records itself ({'; '.join(found)}); use core.records"


def test_the_vocabulary_rule_sees_a_literal(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""fid/final in a docstring is fine."""\nx = {"fid/final": 1, "tags.outcome": "diverged"}\n'
                   'y = f"{family}/best"\nz = "logged as fid/fid10k"\n')
    assert [f.split(": ", 1)[1] for f in vocabulary_literals(bad)] == [
        "'fid/final'", "'tags.outcome'", "'diverged'", "'/best'"]


def test_config_is_pure_data_and_validates_without_torch():
    """Importing and validating a config loads no torch and probes no hardware, so it answers alike everywhere;
    the report command, which only reads the store, starts without torch too."""
    code = ("import sys; from core import config as c; "
            "[c.validate(c.resolve(p)) for p in c.PRESETS]; "
            "assert 'torch' not in sys.modules, 'core.config loaded torch'; "
            "import studies.report.__main__, studies.verdict, core.records; "
            "assert 'torch' not in sys.modules, 'the report command loaded torch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
