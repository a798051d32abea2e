"""The layout of the code: what may import what, read from the imports themselves (ast), and what
an installed wheel holds.

Layers, bottom to top; a module imports only from its own layer or the ones below it:

    0  awq_graph.core      the floor: errors, IR, analysis, numerics, records
    1  awq_graph.passes    graph analyses and rewrites (the folder passes/ at the top of the repo)
    2  stages              load, export, calib, runtime, outdir < match, verify < search < quantize < emit
    3  awq_graph.pipeline  compile(): the stages in order (its package: options, checks, calibration,
                           report, driver)
    4  awq_graph.cli       and the package's own __init__ / __main__ (the public API)
    5  tools/              benchmarks and table generators
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAGE_RANK = {"load": 0, "export": 0, "calib": 0, "runtime": 0, "outdir": 0, "interrupt": 0, "gguf_weights": 0, "weights": 0,
              "checkpoint": 0, "fingerprint": 0, "match": 1, "verify": 1, "guard": 1, "float_eval": 1,
              "search": 2, "head_table": 3, "emit": 4, "compressed": 4, "sampling": 4}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "passes":
        parts = ["awq_graph"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [*REPO.glob("awq_graph/**/*.py"), *REPO.glob("passes/*.py"), *REPO.glob("tools/*.py")]
    return {_module_name(f): f for f in files}


def _level(module: str) -> tuple[int, int]:
    """(layer, rank within the stages) of one of our modules."""
    parts = module.split(".")
    if parts[0] == "tools":
        return 5, 0
    if module in ("awq_graph", "awq_graph.__main__", "awq_graph.cli"):
        return 4, 0
    if module == "awq_graph.pipeline" or module.startswith("awq_graph.pipeline."):
        return 3, 0
    if parts[1] == "core":
        return 0, 0
    if parts[1] == "passes":
        return 1, 0
    assert parts[1] in STAGE_RANK, f"{module} is in no layer: add it to STAGE_RANK or move it"
    return 2, STAGE_RANK[parts[1]]


def _imports(module: str, path: Path):
    """(imported module, imported names, line) for every import of ours in ``path``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names], node.lineno


def _ours(target: str) -> bool:
    return target == "awq_graph" or target.startswith("awq_graph.") or target.split(".")[0] in ("passes", "tools")


def test_each_module_imports_only_its_own_layer_and_the_ones_below():
    sources = _sources()
    wrong = []
    for module, path in sources.items():
        layer, rank = _level(module)
        for target, names, line in _imports(module, path):
            if not _ours(target):
                continue
            if target.split(".")[0] == "passes":
                wrong.append(f"{path.relative_to(REPO)}:{line} imports the top-level 'passes': use awq_graph.passes")
                continue
            # `from awq_graph import core` names a module, not the package's API
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in sources] or [target]
            for t in targets:
                t_layer, t_rank = _level(t)
                if (t_layer, t_rank) > (layer, rank) and not (layer == 5 or t == module):
                    wrong.append(f"{path.relative_to(REPO)}:{line} ({module}, layer {layer}.{rank}) imports "
                                 f"{t} (layer {t_layer}.{t_rank})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another():
    files = [*REPO.glob("awq_graph/**/*.py"), *REPO.glob("passes/*.py"), *REPO.glob("tools/*.py"),
             *REPO.glob("tests/*.py")]
    private = []
    for path in files:
        module = _module_name(path) if path.parent.name != "tests" else f"tests.{path.stem}"
        for target, names, line in _imports(module, path):
            if target.split(".")[0] in ("awq_graph", "passes", "tools", "bench_inference", "conftest"):
                private += [f"{path.relative_to(REPO)}:{line}: {target}.{n}" for n in names if n.startswith("_")
                            and not n.startswith("__")]
    assert not private, "\n".join(private)


def test_the_layer_test_sees_every_module():
    sources = _sources()
    assert {"awq_graph.core.ir", "awq_graph.passes.fold", "awq_graph.emit.decoder", "tools.arch_table"} <= set(sources)
    assert _level("awq_graph.core.numerics") < _level("awq_graph.passes.fold") < _level("awq_graph.search") \
        < _level("awq_graph.emit") < _level("awq_graph.pipeline") < _level("awq_graph.cli")


def test_model_types_are_named_in_the_family_table_only():
    """No branch on ``config.model_type`` outside awq_graph/emit/families.py: a comparison or a
    membership test that reads a ``model_type`` attribute, or a literal model type in a comparison."""
    branching = []
    for path in [*REPO.glob("awq_graph/**/*.py"), *REPO.glob("passes/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(n, ast.Attribute) and n.attr == "model_type" for o in operands for n in ast.walk(o)):
                    branching.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert {b.split(":")[0] for b in branching} <= {"awq_graph/emit/families.py"}, branching


# what looks like a module name and is not: the folder's graph file, a config key genai reads
NOT_MODULE_NAMES = {"model.onnx", "num_hidden_layers"}
HF_NAME_PARTS = ("model.", "transformer.", "layers", "self_attn", "attn.", "_proj", "layernorm", "lm_head",
                 "embed_tokens", "wte", "wpe", "ln_", "c_attn", "c_fc", "shared_expert", "experts.")


def _string_literals(tree: ast.AST):
    """(text, line) of every string in the code, docstrings and comments left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value, node.lineno


def test_module_names_of_the_models_are_written_in_the_family_table_only():
    """The decoder writers name no HF module: their names come from a family row's ``Names``
    and from the graph (``GraphFacts``: the layers, the head, the token lookup)."""
    found = []
    for path in REPO.glob("awq_graph/emit/*.py"):
        if path.name == "families.py":
            continue
        for text, line in _string_literals(ast.parse(path.read_text())):
            if text in NOT_MODULE_NAMES:
                continue
            if any(part in text for part in HF_NAME_PARTS):
                found.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert found == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout is not written to)."""
    import shutil

    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("awq_graph", "passes"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    return next(out.glob("awq_graph-*.whl"))


def test_the_wheel_installs_passes_inside_the_package_and_nothing_at_the_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"awq_graph"}, top  # no top-level `passes` to collide with another package's
    for module in ("awq_graph/passes/channel_flow.py", "awq_graph/passes/fold.py", "awq_graph/core/ir.py",
                   "awq_graph/emit/decoder.py", "awq_graph/cli.py"):
        assert module in names, module
    ours = {n for n in names if n.endswith(".py")}
    assert len(ours) == len(list(REPO.glob("awq_graph/**/*.py"))) + len(list(REPO.glob("passes/*.py")))


MAX_LINES = 600  # past this a file is usually several modules


def test_no_source_file_is_several_modules_long():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in [*REPO.glob("awq_graph/**/*.py"), *REPO.glob("passes/*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert long == []


def test_no_command_line_flag_is_compared_in_control_flow():
    """The library decides on its options' values, never on the text of a CLI flag (a comparison
    or a membership test with a string starting with '--')."""
    found = []
    for path in [*REPO.glob("awq_graph/**/*.py"), *REPO.glob("passes/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for operand in [node.left, *node.comparators]:
                    for n in ast.walk(operand):
                        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("--"):
                            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {n.value!r}")
    assert found == []


def test_the_library_names_options_as_the_python_api_does_and_only_the_cli_spells_flags():
    """Outside cli.py no string (docstrings included) spells a command-line flag: messages name an
    option as its keyword, `seqlen=4096`, and the CLI respells it (``cli.respell``)."""
    flag = re.compile(r"(?<![\w-])--[a-z]")
    found = []
    for path in [*REPO.glob("awq_graph/**/*.py"), *REPO.glob("passes/*.py")]:
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and flag.search(node.value):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value[:60]!r}")
    assert found == []


def test_which_group_sizes_a_graph_takes_is_decided_in_one_module():
    """MatMulNBits' padding, QMoE's whole blocks, a compressed-tensors checkpoint's whole groups
    and the head's group are ``core/group_fit.GroupFit``'s: no other module takes a width modulo a
    group size (numerics pads a ragged last group, which is quantizing, not deciding)."""
    modulo_group = re.compile(r"%\s*[\w.]*group")
    found = [f"{path.relative_to(REPO)}:{i}: {line.strip()}"
             for path in [*REPO.glob("awq_graph/**/*.py"), *REPO.glob("passes/*.py")]
             if path.name not in ("group_fit.py", "numerics.py")
             for i, line in enumerate(path.read_text().splitlines(), 1) if modulo_group.search(line)]
    assert found == []


@pytest.mark.parametrize("package", ["awq_graph.emit", "awq_graph.search", "awq_graph.pipeline"])
def test_a_package_face_only_names_what_its_modules_define(package):
    """A package's __init__ holds its docstring and imports: the code lives in its modules."""
    path = REPO / package.replace(".", "/") / "__init__.py"
    body = ast.parse(path.read_text()).body
    code = [type(node).__name__ for node in body[1:] if not isinstance(node, (ast.Import, ast.ImportFrom))]
    assert isinstance(body[0], ast.Expr) and code == []
