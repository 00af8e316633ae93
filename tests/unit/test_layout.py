"""How the code is laid out, checked from its source in milliseconds: no import cycle among the project's modules
(imports inside functions counted), no class over 120 lines but the step timer, the trainer reads only the
Plan, and every flag is typed."""

import ast
import re
from pathlib import Path

from vitbench import cli

from conftest import REPO

COMMANDS = [REPO / "train_vit.py", REPO / "report.py", REPO / "prep_shards.py"]
SOURCES = sorted([*REPO.glob("vitbench/**/*.py"), *COMMANDS])  # every package under vitbench/, sub-packages too
LONG_CLASSES_ALLOWED = {"StepTimer"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    if rel.parts[0] != "vitbench":
        return rel.name
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules PATH imports anywhere in it (top level, functions, classes)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # from vitbench import data
    return found & modules


def test_no_import_cycle_among_the_projects_modules():
    modules = {module_name(p): p for p in SOURCES}
    graph = {m: project_imports(p, set(modules)) - {m} for m, p in modules.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # the Plan opens the data directory through the data package's one entry, never a reader
    assert graph["vitbench.plan"].isdisjoint({"vitbench.data.dali_loader", "vitbench.data.wds_loader"})
    assert "vitbench.data" in graph["vitbench.plan"]
    training = {m for m in modules if not m.startswith("vitbench.testing")}
    assert [m for m in training if any(n.startswith("vitbench.testing") for n in graph[m])] == []


def test_the_data_stack_is_one_package_and_the_commands_sit_side_by_side():
    data = {p.stem for p in (REPO / "vitbench" / "data").glob("*.py")} - {"__init__"}
    assert data >= {"shardformat", "shardread", "remote", "loaders", "wds_loader", "dali_loader", "validation", "prep"}
    assert [p.stem for p in (REPO / "vitbench").glob("*.py") if p.stem in data] == []
    assert all(c.is_file() for c in COMMANDS)


def test_the_paths_the_package_names_are_in_this_checkout():
    """A module that moves into a sub-package keeps pointing at the repository's folders: the demo's shards land
    in the git-ignored shards/demo (not inside the package), configs and vendor profiles are found."""

    import subprocess

    from vitbench import dsconfig, vendor
    from vitbench.data import demo

    assert cli.REPO == REPO
    assert demo.DEFAULT_DIR == REPO / "shards" / "demo"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(demo.DEFAULT_DIR / "_info.json")], cwd=REPO)
    assert ignored.returncode == 0
    assert (dsconfig.DS_CONFIG_DIR / "zero1.json").is_file() and vendor.VENDORS_DIR.parent == REPO
    assert (vendor.VENDORS_DIR / "cpu" / "profile.toml").is_file()


def test_no_file_edits_the_import_path():
    """The project is installed (`pip install -e .`, make setup): no script, test or bench reaches the package
    by editing sys.path or by putting the repository on PYTHONPATH (bench/vs_timm.py puts timm's checkout there:
    another project)."""

    files = [p for p in [*REPO.glob("**/*.py"), REPO / "Makefile", *REPO.glob(".ci/*")]
             if ".venv" not in p.parts and p.is_file()]
    pattern = re.compile(r"sys\.path\.(insert|append)|sys\.path\[|PYTHONPATH.*\b(REPO|CURDIR|HERE)\b")
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and p != Path(__file__)]
    assert offenders == []


def test_no_class_over_120_lines_but_the_step_timer():
    long = [f"{p.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for p in SOURCES
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 120
            and node.name not in LONG_CLASSES_ALLOWED]
    assert long == []


def test_the_trainer_reads_no_flag_only_the_plan():
    tree = ast.parse((REPO / "train_vit.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args}
    assert not names & {"args", "flags", "argparse"}


def test_only_the_device_layer_talks_to_torch_cuda():
    """Every accelerator goes through vitbench/device.py (DeepSpeed's accelerator API); a `torch.cuda` call
    anywhere else would make that code CUDA-only (an XPU, NPU or HPU launch would fall back to the CPU's path)."""

    offenders = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES if p.name != "device.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"\btorch\.cuda\b|\bfrom torch import cuda\b", line)]
    assert offenders == []


def test_every_flag_is_typed_in_flags():
    dests = {a.dest for a in cli.build_parser()._actions if a.dest != "help"}
    assert dests <= set(cli.Flags.__annotations__)
    assert set(cli.Flags.__annotations__) - dests == {"fix_hp", "vendor_profile"}  # set by parse_args


def test_make_clean_removes_only_what_the_demo_and_benches_made(tmp_path):
    import shutil
    import subprocess

    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    made = ["runs/demo/results.json", "shards/demo/_info.json", "bench/out/x.json"]
    users = ["runs/vit_base_1x8_amp/results.json", "runs/vit_base_1x8_amp/checkpoints/step_1/x", "prep_shards.py",
             "shards/imagenet/_info.json"]
    for rel in made + users:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True)
    assert [rel for rel in made if (tmp_path / rel).exists()] == []
    assert [rel for rel in users if not (tmp_path / rel).exists()] == []


def test_every_makefile_target_is_in_the_readme():

    targets = re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M)
    readme = (REPO / "README.md").read_text()
    assert set(targets) >= {"setup", "demo", "test", "test-fast", "bench", "clean"}
    assert [t for t in targets if f"make {t}" not in readme] == []


def test_the_unit_layer_launches_no_training_and_every_integration_test_is_slow():
    """tests/unit runs in-process (make test-fast); a test that launches a training run, a SLURM job or any other
    process it waits on is an integration test, marked slow (tests/README.md)."""
    def launches(tree) -> list[int]:
        """Lines of calls that start training: conftest's launch helpers, or a command line naming train_vit.py or
        an accelerate launcher (a source read by ast, as here, starts nothing)."""
        found = []
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            if getattr(call.func, "id", None) in {"launch", "launch_machines", "launch_together"}:
                found.append(call.lineno)
            elif getattr(call.func, "attr", None) in {"run", "Popen"} and any(
                    (isinstance(c, ast.Constant) and c.value in ("train_vit.py", "accelerate", "accelerate-launch"))
                    or (isinstance(c, ast.Name) and c.id in {"ACCELERATE_LAUNCH", "USER_LAUNCH", "LAUNCH"})
                    for a in call.args for c in ast.walk(a)):
                found.append(call.lineno)
        return found

    unit = sorted((REPO / "tests" / "unit").glob("test_*.py"))
    assert [f"{p.name}:{n}" for p in unit for n in launches(ast.parse(p.read_text()))] == []
    for path in sorted((REPO / "tests" / "integration").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_slow = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                          and "slow" in ast.unparse(n.value) for n in tree.body)
        tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        unmarked = [n.name for n in tests if not module_slow and "slow" not in ast.unparse(n.decorator_list or [])]
        assert unmarked == [], path.name
