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
