"""The device kit is complete before any GPU call: pip resolves the project offline for the device's Python
from the kit and the device's recorded packages alone, and on this machine an environment shaped like the
device's (its package set, no kit packages) takes the kit with `--no-index` through scripts/gpu_check.sh
and runs the check's stages at toy sizes. Needs PyPI (the kit is downloaded; CI has it)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neox_zoology import registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_kit  # noqa: E402

pytestmark = pytest.mark.slow


def offline_env(**extra) -> dict:
    """This environment without pip's configuration (no local find-links, no indexes)."""
    return {**gpu_kit.hermetic_env(), **extra}


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kit312")
    proc = subprocess.run([sys.executable, "scripts/gpu_kit.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_kit_resolves_the_project_offline_for_python_312(kit):
    manifest = json.loads((kit / "MANIFEST.json").read_text())
    assert manifest["python_version"] == "3.12"
    installs = {gpu_kit.normalize(i["name"]): i for i in manifest["verification"]["installs"]}
    for name in ("deepspeed", "megatron-core", "pydantic", "pydantic-core", "hjson", "zstandard"):
        assert installs[name]["from"] == "kit", name
    assert installs["torch"] == {"name": "torch", "version": "2.11.0", "from": "device"}
    assert {i["from"] for i in installs.values()} == {"kit", "device"}
    compiled = [f["file"] for f in manifest["files"] if not f["file"].endswith("-py3-none-any.whl")]
    assert compiled and all("-cp312-" in f or "-abi3-" in f for f in compiled)  # 3.12's ABI or the stable one
    assert manifest["total_bytes"] < gpu_kit.MAX_BYTES
    assert subprocess.run([sys.executable, "scripts/gpu_kit.py", "--verify", "--out", str(kit)], cwd=ROOT,
                          capture_output=True, text=True).returncode == 0


def test_a_kit_missing_a_wheel_is_refused_naming_it(kit, tmp_path):
    partial = tmp_path / "kit"
    shutil.copytree(kit, partial)
    next(partial.glob("hjson-*.whl")).unlink()
    proc = subprocess.run([sys.executable, "scripts/gpu_kit.py", "--verify", "--out", str(partial)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "incomplete for Python 3.12" in proc.stderr and "hjson" in proc.stderr


def test_check_refuses_a_kit_for_another_python_or_a_changed_file(kit, tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_kit.py", "--check", "--out", str(kit)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "is for Python 3.12" in proc.stderr  # this machine runs 3.11
    tampered = tmp_path / "kit"
    shutil.copytree(kit, tampered)
    manifest = json.loads((tampered / "MANIFEST.json").read_text())
    manifest["python_version"] = f"{sys.version_info.major}.{sys.version_info.minor}"
    (tampered / "MANIFEST.json").write_text(json.dumps(manifest))
    with open(next(tampered.glob("hjson-*.whl")), "ab") as f:
        f.write(b"x")
    proc = subprocess.run([sys.executable, "scripts/gpu_kit.py", "--check", "--out", str(tampered)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "does not match its manifest" in proc.stderr


def device_like_env(path: Path) -> Path:
    """A fresh virtual environment holding the packages the device provides (names from
    scripts/gpu_device_packages.txt; this machine's CPU torch pin instead of the device's CUDA build), and
    none of the kit's."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(path)], check=True)
    pin = next(ln.strip() for ln in (ROOT / "constraints-cpu.txt").read_text().splitlines() if ln.startswith("torch=="))
    names = [n for n, _ in gpu_kit.device_packages() if n != "torch"]
    proc = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", pin, *names],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path / "bin" / "python"


def test_gpu_check_installs_the_kit_offline_and_runs_its_stages_here(kit, tmp_path):
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    kit_here = tmp_path / "kit"
    kit_here.mkdir()
    for wheel in kit.glob("*-py3-none-any.whl"):  # the pure-Python wheels (DeepSpeed's build too) serve any 3.x
        shutil.copy(wheel, kit_here)
    proc = subprocess.run([sys.executable, "scripts/gpu_kit.py", "--python-version", here, "--out", str(kit_here)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    python = device_like_env(tmp_path / "env")
    missing = subprocess.run([str(python), "-c", "import deepspeed"], capture_output=True, text=True)
    assert missing.returncode != 0  # the device's shape: the kit's packages are not there yet
    torch_before = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                                  capture_output=True, text=True, check=True).stdout.strip()

    out = tmp_path / "out"
    env = offline_env(PYTHON=str(python), GPU_KIT=str(kit_here), OMP_NUM_THREADS="2")
    env.pop("OUT", None)
    proc = subprocess.run(["scripts/gpu_check.sh", "--rehearsal", "--stages", "every_mixer,fast_paths,memory_plan,mqar",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["environment"]["executable"].startswith(str(tmp_path / "env"))
    assert report["environment"]["torch"] == torch_before  # the install kept the environment's torch
    assert [(s["name"], s["status"]) for s in report["stages"]] == [
        ("every_mixer", "ok"), ("fast_paths", "ok"), ("memory_plan", "ok"), ("mqar", "ok")]
    summary = report["summary"]
    assert summary["every_mixer"]["finite"] and len(summary["every_mixer"]["layer_types"]) == len(registry.names())
    assert summary["fast_paths"].get("failed", 0) == 0 and not summary["fast_paths"]["failed_tests"]
    assert {m["cell"].split("|")[0] for m in summary["mqar"]} == {"attention", "baseconv"}
    assert set(report["stages"][2]["result"]) == {"demo_cpu"}
    shown = subprocess.run([str(python), "-m", "pip", "show", "deepspeed", "megatron-core"],
                           capture_output=True, text=True, check=True).stdout
    assert re.findall(r"^Version: (.*)$", shown, flags=re.M) == ["0.19.8", "0.16.1"]
    assert (out / "device_packages.txt").read_text().count("==") > 10
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what the device tool brings back
