"""The shape of the code, checked: the library imports nothing above it, only a layer type's own file
(and the registry) names it, and every command the documentation shows answers `--help`.

Layer types are added by one file and one registration; these checks keep it so (a name string
elsewhere in the library is a branch on a layer type; an upward import ties the library to one
application). Benchmarks, experiment definitions, configs and tests name the types they compare.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT
from neox_zoology import registry

LIBRARY = ROOT / "neox_zoology"
UPWARD = ("eval", "tokenization", "bench", "tests", "train", "scripts")
EXPERIMENTS = {"eval/mqar/configs.py", "eval/demo.py"}
"""Experiment definitions: which layer types an experiment compares is their content."""


def _py_files(*roots: str) -> list[Path]:
    out = []
    for root in roots:
        path = ROOT / root
        out += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_the_library_imports_nothing_above_it():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in _py_files("neox_zoology")
           for line, mod in _imports(p)
           if mod.split(".")[0] in UPWARD or mod == "neox_zoology.training.cli" and p.name != "cli.py"]
    assert not bad, "the library must not import the applications above it:\n" + "\n".join(bad)


def test_the_import_check_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from eval.hook import ArSliceHook\n    import tokenization.bigrams\n")
    assert [m for _, m in _imports(probe)] == ["eval.hook", "tokenization.bigrams"]


def _type_names() -> dict[str, str]:
    """Every registered name and alias -> the file or package folder that defines its module."""
    import neox_zoology.mixers  # noqa: F401 - registers the built-in types

    out = {}
    for name in registry.names():
        spec = registry.get(name)
        module = Path(sys.modules[spec.module.__module__].__file__).resolve()
        home = module.parent if module.parent != LIBRARY / "mixers" else module
        for n in (name, *spec.aliases):
            out[n] = home
    return out


def _name_strings(path: Path, names) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]


def test_no_layer_type_name_outside_its_own_file():
    homes = _type_names()
    bad = []
    for path in _py_files("neox_zoology", "eval", "tokenization", "scripts", "train.py"):
        rel = str(path.relative_to(ROOT))
        if rel in EXPERIMENTS or path == LIBRARY / "registry.py":
            continue
        for line, name in _name_strings(path, homes):
            home = homes[name]
            if not (path == home or home.is_dir() and home in path.parents):
                bad.append(f"{rel}:{line} names the layer type {name!r} (its home: {home.relative_to(ROOT)})")
    assert not bad, ("only a layer type's own file and the registry may name it; ask the registry "
                     "(a MixerSpec field or hook) instead:\n" + "\n".join(bad))


def test_the_name_check_finds_a_name(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("if layer_type == 'hyena':\n    pass\n")
    assert _name_strings(probe, _type_names()) == [(1, "hyena")]


def documented_modules() -> list[str]:
    """Every `python -m MODULE` in the README, docs/ and the Makefile."""
    found = set()
    for path in [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]:
        found |= set(re.findall(r"python -m ((?:neox_zoology|eval|tokenization|bench)[a-zA-Z0-9_.]*)", path.read_text()))
    return sorted(found)


def test_documentation_names_commands():
    assert "tokenization.preprocess" in documented_modules()  # the scan reads what the README shows


@pytest.mark.slow
def test_every_documented_command_answers_help():
    modules = documented_modules()

    def helps(module: str):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=180)
        out = r.stdout + r.stderr
        return module, r.returncode if "usage" in out else f"{r.returncode} without a usage line", out[-600:]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(helps, modules))
    bad = [f"python -m {m} --help: exit {rc}\n{out}" for m, rc, out in results if rc != 0]
    assert not bad, "\n\n".join(bad)


# ------------------------------------------------------------------ file size, docstrings, private imports
LIBRARY_ROOTS = ("neox_zoology", "eval", "tokenization")
FIRST_PARTY = ("neox_zoology", "eval", "tokenization", "bench", "train")
MAX_LINES = 520
"""A library file does one thing; past this it is split along its sections (docs/layout.md)."""
MAX_DOCSTRING_LINES = 20
"""A module docstring says what the code does and its invariants; derivations and measurements go to docs/."""
NOT_YET_SPLIT: set[str] = set()
"""Files still over MAX_LINES (docs/layout.md, 'Still to do'); each must still be over it, so the list shrinks."""
LONG_DOCSTRINGS: set[str] = set()
"""Module docstrings still over MAX_DOCSTRING_LINES (docs/layout.md, 'Still to do'); each must still be over it."""


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def long_files(paths, root: Path = ROOT, limit: int = MAX_LINES) -> dict[str, int]:
    out = {}
    for p in paths:
        n = p.read_text().count("\n")
        if n > limit:
            out[_rel(p, root)] = n
    return out


def long_docstrings(paths, root: Path = ROOT, limit: int = MAX_DOCSTRING_LINES) -> dict[str, int]:
    out = {}
    for p in paths:
        doc = ast.get_docstring(ast.parse(p.read_text()), clean=False)
        n = len(doc.splitlines()) if doc else 0
        if n > limit:
            out[_rel(p, root)] = n
    return out


def private_imports(path: Path) -> list[str]:
    """`from <first-party module> import _name` (or a relative import of one): another module's private."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        ours = node.level > 0 or (node.module or "").split(".")[0] in FIRST_PARTY
        for alias in node.names:
            if ours and alias.name.startswith("_") and not alias.name.startswith("__"):
                bad.append(f"{path.name}:{node.lineno} imports {alias.name} from {'.' * node.level}{node.module or ''}")
    return bad


def test_no_library_file_is_over_the_size_limit():
    found = long_files(_py_files(*LIBRARY_ROOTS))
    bad = {f: n for f, n in found.items() if f not in NOT_YET_SPLIT}
    assert not bad, f"split these along their sections (at most {MAX_LINES} lines): {bad}"
    assert NOT_YET_SPLIT <= set(found), f"now within the limit, remove from NOT_YET_SPLIT: {NOT_YET_SPLIT - set(found)}"


def test_the_size_check_finds_a_long_file(tmp_path):
    (tmp_path / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "small.py").write_text("x = 1\n" * MAX_LINES)
    assert long_files(sorted(tmp_path.glob("*.py")), tmp_path) == {"big.py": MAX_LINES + 1}


def test_no_module_docstring_is_over_the_limit():
    found = long_docstrings(_py_files(*LIBRARY_ROOTS))
    bad = {f: n for f, n in found.items() if f not in LONG_DOCSTRINGS}
    assert not bad, (f"module docstrings of at most {MAX_DOCSTRING_LINES} lines: move derivations and measurements "
                     f"to docs/: {bad}")
    assert LONG_DOCSTRINGS <= set(found), f"now within the limit, remove from LONG_DOCSTRINGS: {LONG_DOCSTRINGS - set(found)}"


def test_the_docstring_check_finds_a_long_docstring(tmp_path):
    (tmp_path / "long.py").write_text('"""' + "line\n" * (MAX_DOCSTRING_LINES + 1) + '"""\nx = 1\n')
    (tmp_path / "short.py").write_text('"""One line."""\nx = 1\n')
    assert long_docstrings(sorted(tmp_path.glob("*.py")), tmp_path) == {"long.py": MAX_DOCSTRING_LINES + 1}


def test_no_module_imports_another_modules_private_names():
    bad = [line for p in _py_files(*LIBRARY_ROOTS, "bench", "train.py") for line in private_imports(p)]
    assert not bad, "make the name public where another module needs it:\n" + "\n".join(bad)


def test_the_private_import_check_finds_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from neox_zoology.mixers.attention import _validate\nfrom .x import _y\n"
                     "from megatron.core import _private\nfrom neox_zoology import __version__\n")
    assert private_imports(probe) == ["probe.py:1 imports _validate from neox_zoology.mixers.attention",
                                      "probe.py:2 imports _y from .x"]


# ------------------------------------------------------------------ one .idx reader, one atomic writer
STAGED_COMMITS = {"tokenization/preprocess.py", "tokenization/demo_corpus.py",
                  "neox_zoology/training/checkpoint/saving.py"}
"""Sets of files (or a folder) renamed into place in an order, their own commits; single files are written
through neox_zoology/io.py."""


def renames(path: Path) -> list[int]:
    """Lines of `os.replace(...)` / `os.rename(...)` calls."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("replace", "rename") and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "os"]


def idx_magic(path: Path) -> list[int]:
    """Lines of a str or bytes constant holding the .idx magic `MMIDIDX`."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))
            and (b"MMIDIDX" if isinstance(node.value, bytes) else "MMIDIDX") in node.value]


def test_files_are_renamed_into_place_only_by_the_atomic_writer():
    bad = [f"{_rel(p, ROOT)}:{line}" for p in _py_files(*LIBRARY_ROOTS, "bench", "scripts", "train.py")
           if _rel(p, ROOT) not in STAGED_COMMITS | {"neox_zoology/io.py"} for line in renames(p)]
    assert not bad, "write single files through neox_zoology.io (atomic_path, atomic_write_*):\n" + "\n".join(bad)


def test_the_rename_check_finds_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nos.replace('a', 'b')\ntext.replace('a', 'b')\nos.rename('a', 'b')\n")
    assert renames(probe) == [2, 4]


def test_only_neox_zoology_indexed_reads_the_idx_format():
    bad = [f"{_rel(p, ROOT)}:{line}" for p in _py_files(*LIBRARY_ROOTS, "bench", "scripts", "train.py")
           if p != LIBRARY / "indexed.py" for line in idx_magic(p)]
    assert not bad, "read .idx files through neox_zoology.indexed (read_index):\n" + "\n".join(bad)


def test_the_idx_check_finds_the_magic(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("MAGIC = b'MMIDIDX\\x00\\x00'\nNAME = 'MMIDIDX'\nOTHER = b'MMID'\n")
    assert idx_magic(probe) == [1, 2]


def test_the_generated_doc_tables_match_the_code():
    """docs/layers.md's layer table (registry) and docs/config-keys.md's accepted keys (Args) are what
    `python -m neox_zoology.doc_tables` writes: a default, key or layer type cannot change without its docs."""
    from neox_zoology import doc_tables, registry

    for page, text in doc_tables.pages().items():
        assert page.read_text() == text, f"{_rel(page, ROOT)} is stale: run python -m neox_zoology.doc_tables"
    layer_table = "\n".join(doc_tables.layer_rows())
    for name in registry.names():
        spec = registry.get(name)
        assert spec.doc and f"`{registry.config_name(name)}`" in layer_table, f"{name}: no doc / not in the table"


def test_the_table_replacement_finds_a_stale_row():
    from neox_zoology import doc_tables

    rows = doc_tables.layer_rows()
    text = "intro\n\n" + "\n".join(rows[:2] + ["| `old` | gone | `old: {}` | heads |"]) + "\n\nafter\n"
    fixed = doc_tables.replace_table(text, rows)
    assert "`old`" not in fixed and fixed.startswith("intro\n\n" + rows[0]) and fixed.endswith("\n\nafter\n")
    assert doc_tables.yaml_value(1e-5) == "1.0e-5" and doc_tables.yaml_value([1.0, None, True]) == "[1.0, null, true]"
    assert doc_tables.yaml_value(1e20) == "1.0e20" and doc_tables.yaml_value(0.5) == "0.5"
    assert doc_tables.main(["--check"]) == 0
