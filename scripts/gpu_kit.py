"""The device kit: wheels for a GPU machine with no network, and the proof that they are enough.

    python scripts/gpu_kit.py [--out .gpu-kit] [--python-version 3.12]   # make the kit (needs PyPI)
    python scripts/gpu_kit.py --verify [--out .gpu-kit]                  # resolve offline again, nothing fetched
    python scripts/gpu_kit.py --check [--out .gpu-kit]                   # on the device: files and interpreter

Making the kit: every pin of `scripts/gpu_kit.txt` is downloaded as a wheel for the target Python on
manylinux x86-64; a pin marked `# sdist` (DeepSpeed, which PyPI ships only as source) is built here into a
wheel with no ops precompiled (`DS_BUILD_OPS=0`, `--no-build-isolation`: this interpreter's torch). Wheels
already in the kit at the pinned version are kept. `MANIFEST.json` lists every file with its size and
sha256, the target Python and the verification below.

Verification (`--verify`, and the last step of making): pip resolves the project's requirements
(`neox-zoology[dev]` from pyproject.toml) for the target Python fully offline: `--no-index`, this kit plus
metadata-only stand-ins of what the device's image provides (`scripts/gpu_device_packages.txt`), no pip
configuration or PIP_* variables of this machine. It fails, naming pip's complaint, when a requirement
is missing from both; it also fails when anything would come from elsewhere, and when the device's torch
would be replaced.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "scripts" / "gpu_kit.txt"
DEVICE = ROOT / "scripts" / "gpu_device_packages.txt"
DEFAULT_KIT = ROOT / ".gpu-kit"
DEFAULT_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
MAX_BYTES = 48 << 20
"""The device call carries the repository and the kit together within 64 MiB; the kit keeps to 48."""


class KitError(RuntimeError):
    pass


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = PINS) -> list[tuple[str, str, bool]]:
    """(name, version, built_from_sdist) per `name==version` line."""
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        if not m:
            raise KitError(f"{path}:{n}: {line!r} is not name==version; pin every kit package exactly")
        out.append((m.group(1), m.group(2), comment.strip() == "sdist"))
    return out


def hermetic_env() -> dict[str, str]:
    """This environment without pip's configuration: no PIP_* variables, no config files (so no local
    find-links or extra indexes take part)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(args: list[str], env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise KitError(f"pip {args[0]} failed (exit {proc.returncode}):\n{tail}")
    return proc


def _platform_args(python_version: str) -> list[str]:
    out = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
    for p in PLATFORMS:
        out += ["--platform", p]
    return out


def _have(kit: Path, name: str, version: str) -> Path | None:
    stem = normalize(name).replace("-", "_")
    for f in kit.glob("*.whl"):
        parts = f.name.split("-")
        if normalize(parts[0]).replace("-", "_") == stem and parts[1] == version:
            return f
    return None


def _wheel_matches(path: Path, python_version: str) -> bool:
    """A pure-Python wheel fits any Python 3; a compiled one only its cpXY."""
    tag = path.name[:-4].split("-")[-3]
    return tag.startswith("py3") or tag == "cp" + python_version.replace(".", "")


def download(kit: Path, python_version: str, log=print) -> None:
    kit.mkdir(parents=True, exist_ok=True)
    pins = read_pins()
    wanted = {normalize(n) for n, _, _ in pins}
    for f in kit.glob("*.whl"):  # drop wheels of other versions or packages, and of another Python
        name, version = f.name.split("-")[:2]
        pin = next((p for p in pins if normalize(p[0]) == normalize(name)), None)
        if normalize(name) not in wanted or pin is None or pin[1] != version or not _wheel_matches(f, python_version):
            f.unlink()
    binary = [f"{n}=={v}" for n, v, sdist in pins if not sdist and _have(kit, n, v) is None]
    if binary:
        log(f"gpu-kit: downloading {len(binary)} wheels for Python {python_version}: {', '.join(binary)}")
        _pip(["download", "--no-deps", "-d", str(kit), *_platform_args(python_version), *binary])
    for name, version, sdist in pins:
        if not sdist or _have(kit, name, version) is not None:
            continue
        log(f"gpu-kit: building a wheel of {name}=={version} from its sdist (no ops precompiled)")
        with tempfile.TemporaryDirectory() as tmp:
            _pip(["download", "--no-deps", "--no-binary=:all:", "-d", tmp, f"{name}=={version}"])
            src = next(Path(tmp).glob("*.tar.gz"))
            env = {**os.environ, "DS_BUILD_OPS": "0"}
            proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                                   "--no-index", "-w", str(kit), str(src)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
                raise KitError(f"building {name}=={version} failed:\n{tail}")
        built = _have(kit, name, version)
        if built is None or not built.name.endswith("-py3-none-any.whl"):
            raise KitError(f"building {name}=={version} gave {built}; expected a pure-Python wheel")


# ---------------------------------------------------------------------------------------- verification

def device_packages(path: Path = DEVICE) -> list[tuple[str, str]]:
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.partition("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise KitError(f"{path}:{n}: {line!r} is not name==version")
            out.append((name.strip(), version.strip()))
    return out


def stub_wheel(dest: Path, name: str, version: str) -> Path:
    """A wheel that carries only metadata: what pip needs to treat `name==version` as available."""
    dist = f"{normalize(name).replace('-', '_')}-{version}"
    path = dest / f"{dist}-py3-none-any.whl"
    info = f"{dist}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: neox_zoology gpu_kit\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr(f"{info}/RECORD", record)
    return path


def project_requirements() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [*project["dependencies"], *extras.get("dev", []), *extras.get("cuda", [])]


def verify(kit: Path, python_version: str) -> dict:
    """Resolve the project's requirements offline from the kit and the device stand-ins (see the module
    docstring). Returns {"installs": [{name, version, from}], ...}; raises KitError when incomplete."""
    if not kit.is_dir() or not any(kit.glob("*.whl")):
        raise KitError(f"no kit at {kit}: run `make gpu-kit` (needs network to PyPI)")
    device = device_packages()
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "device"
        stubs.mkdir()
        for name, version in device:
            stub_wheel(stubs, name, version)
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(project_requirements()) + "\n")
        report = Path(tmp) / "report.json"
        proc = _pip(["install", "--dry-run", "--ignore-installed", "--report", str(report), "--no-index",
                     "--find-links", str(kit), "--find-links", str(stubs), *_platform_args(python_version),
                     "--target", str(Path(tmp) / "target"), "-r", str(reqs)], env=hermetic_env(), check=False)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-6:]
            raise KitError("the kit is incomplete for Python " + python_version + ": " + " / ".join(lines)
                           + f"\n(add the missing package to {PINS.relative_to(ROOT)}, or to "
                             f"{DEVICE.relative_to(ROOT)} if the device provides it, then `make gpu-kit`)")
        installs = []
        for item in json.loads(report.read_text())["install"]:
            url = item["download_info"]["url"]
            source = "kit" if url.startswith(kit.resolve().as_uri()) else "device" if url.startswith(
                stubs.resolve().as_uri()) else url
            installs.append({"name": item["metadata"]["name"], "version": item["metadata"]["version"], "from": source})
    strays = [i for i in installs if i["from"] not in ("kit", "device")]
    if strays:
        raise KitError(f"resolution used files outside the kit: {strays}")
    torch_ = next((i for i in installs if normalize(i["name"]) == "torch"), None)
    if torch_ is None or torch_["from"] != "device":
        raise KitError(f"the project's torch requirement would not be met by the device's torch: {torch_}")
    unused = sorted({f.name for f in kit.glob("*.whl")} - {
        f.name for f in kit.glob("*.whl") for i in installs
        if i["from"] == "kit" and normalize(f.name.split("-")[0]) == normalize(i["name"])})
    return {"python_version": python_version, "requirements": project_requirements(),
            "installs": sorted(installs, key=lambda i: (i["from"], normalize(i["name"]))),
            "unused_kit_files": unused}


# -------------------------------------------------------------------------------------------- manifest

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(kit: Path, python_version: str, verification: dict) -> dict:
    files = [{"file": f.name, "bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(kit.glob("*.whl"))]
    total = sum(f["bytes"] for f in files)
    if total > MAX_BYTES:
        raise KitError(f"the kit is {total / 2**20:.1f} MiB, over its {MAX_BYTES >> 20} MiB share of what a "
                       "device call carries")
    manifest = {"python_version": python_version, "platforms": list(PLATFORMS), "files": files, "total_bytes": total,
                "pins": PINS.read_text(), "device_packages": [f"{n}=={v}" for n, v in device_packages()],
                "verification": verification}
    (kit / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check(kit: Path) -> dict:
    """On the machine that installs the kit: the manifest is there, every file matches it, and this
    interpreter is the Python the kit was made for."""
    path = kit / "MANIFEST.json"
    if not path.exists():
        raise KitError(f"no {path}: make the kit with `make gpu-kit` on a machine with network, and carry it")
    manifest = json.loads(path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != here:
        raise KitError(f"the kit at {kit} is for Python {manifest['python_version']}, this is Python {here}: "
                       f"`python scripts/gpu_kit.py --python-version {here}`")
    for f in manifest["files"]:
        p = kit / f["file"]
        if not p.exists():
            raise KitError(f"{p} is missing (listed in the manifest): make the kit again")
        if p.stat().st_size != f["bytes"] or sha256(p) != f["sha256"]:
            raise KitError(f"{p} does not match its manifest entry (size or sha256): make the kit again")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/gpu_kit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_KIT), help="kit folder (default .gpu-kit, git-ignored)")
    p.add_argument("--python-version", default=DEFAULT_PYTHON, help="the device's Python (default 3.12)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true", help="only resolve offline again (no download)")
    mode.add_argument("--check", action="store_true", help="on the device: manifest, files, interpreter")
    ns = p.parse_args(argv)
    kit = Path(ns.out).resolve()
    try:
        if ns.check:
            m = check(kit)
            print(f"gpu-kit: {len(m['files'])} wheels for Python {m['python_version']} intact "
                  f"({m['total_bytes'] / 2**20:.1f} MiB)")
            return 0
        if not ns.verify:
            download(kit, ns.python_version)
        else:
            old = kit / "MANIFEST.json"
            if old.exists():
                ns.python_version = json.loads(old.read_text())["python_version"]
        result = verify(kit, ns.python_version)
        m = write_manifest(kit, ns.python_version, result)
    except KitError as exc:
        print(f"gpu-kit: {exc}", file=sys.stderr)
        return 1
    from_kit = [f"{i['name']} {i['version']}" for i in result["installs"] if i["from"] == "kit"]
    from_device = [f"{i['name']} {i['version']}" for i in result["installs"] if i["from"] == "device"]
    print(f"gpu-kit: {kit} holds {len(m['files'])} wheels, {m['total_bytes'] / 2**20:.1f} MiB, for Python "
          f"{ns.python_version}; offline resolution of neox-zoology[dev] complete:\n"
          f"  from the kit: {', '.join(from_kit)}\n  from the device: {', '.join(from_device)}"
          + (f"\n  not needed at this device's versions: {', '.join(result['unused_kit_files'])}"
             if result["unused_kit_files"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
