"""The device check: the CUDA path of this project measured on one GPU, within a wall-time budget.

    python -m bench.gpu_check [--smoke] [--out DIR] [--budget-s S]      # on a CUDA machine
    python -m bench.gpu_check --rehearsal --out DIR                       # the same stages, tiny, on the CPU

`scripts/gpu_check.sh` (`make gpu-check`) installs the offline kit first and then runs this. Stages, in
this order (each a subprocess with its own time limit; a failure or a timeout is recorded
and the next stage runs; a stage that no longer fits the budget is recorded as skipped):

- `fast_paths`: the CUDA-only tests of tests/test_fast_paths.py (every fast path against the portable
  code: bf16 mixers vs fp32, FFT convolution in fp32, flash SDPA vs math; apex and FlashFFTConv skip
  where those packages are absent), torch.compile tests excluded;
- `every_mixer`: one model holding every registered layer type once, two bf16 training steps through the
  trainer (DeepSpeed engine, megatron-core layers, NCCL at world size 1): finite losses, nothing raises;
- `throughput`: bench.train_throughput of the 360M configs, bf16, L 2048, micro-batch 8, no activation
  checkpointing: tokens/s, MFU, peak memory, and a torch.profiler table per config;
- `memory_plan`: the `--dry-run` plan of the same configs with the same overrides, next to the measured
  peak (`torch.cuda.max_memory_allocated` against the plan without its runtime reserve);
- `mqar`: a timed slice of the MQAR `paper` sweep (attention and BaseConv, L 256, d 128, one lr) on the GPU;
- `throughput_more`: Hyena, H3, RWKV at 360M, when time is left;
- `compile`: the torch.compile-on-CUDA tests, when time is left.

`--smoke` (about two minutes): fast_paths, every_mixer, one 360M row with few steps, its plan, a short
MQAR slice.
`--rehearsal`: every stage at toy sizes on whatever device there is (the CPU here), to prove the
orchestration and the trainer path before a GPU call.

Output, 8 files at most: `gpu_check.json` (every stage, rewritten after each), `gpu_check.md`,
`train_throughput_gpu.{json,md}`, `profile_gpu.txt`, `pytest_cuda.log`, `gpu_check.log` (the install and
every stage's output) and, from scripts/gpu_check.sh, `device_packages.txt`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL_TYPES_CONFIG = "configs/neox/demo_cpu.yml"
CORE_CONFIGS = ["attention", "baseconv", "baseconv_random", "baseconv_programmatic", "baseconv_learned"]
MORE_CONFIGS = ["hyena", "h3", "rwkv"]
PLAN_MEASURED_TOLERANCE = 0.15


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="the short check (a few minutes)")
    mode.add_argument("--rehearsal", action="store_true", help="every stage at toy sizes, on the CPU if no GPU")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "gpu"),
                   help="output folder (default $OUT, else bench/results/gpu)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-time budget of all stages (default: 150 smoke, 450 full, 900 rehearsal)")
    p.add_argument("--stages", default=None, help="comma-separated subset of the stages to run")
    p.add_argument("--_plan", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.budget_s is None:
        ns.budget_s = 150 if ns.smoke else 900 if ns.rehearsal else 450
    return ns


# ------------------------------------------------------------------------------------------ the stages

def _tt(configs, seq_len, micro_batch, warmup, steps, out_json, extra=()):
    cmd = [sys.executable, "-m", "bench.train_throughput", "--bf16", "--seq-len", str(seq_len),
           "--micro-batch", str(micro_batch), "--warmup", str(warmup), "--steps", str(steps),
           "--checkpoint-activations", "off", "--out", str(out_json)]
    for c in configs:
        cmd += ["--config", c]
    return cmd + list(extra)


def stages(ns, out: Path, tmp: Path) -> list[dict]:
    """Each stage: name, cmd, timeout (s), min_s (skipped when less is left), optional."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_fast_paths.py"]
    from neox_zoology import registry

    types = [registry.config_name(t) for t in registry.names()]  # every registered layer type, one layer each
    every = ["--set", f"num_layers={len(types)}", "--set",
             "attention_config=" + json.dumps([[types, "all"]]), "--vocab", "1024"]
    tiny = ns.rehearsal
    cfg = (lambda name: f"configs/neox/{name}_360m.yml") if not tiny else (lambda name: ALL_TYPES_CONFIG)
    core = CORE_CONFIGS if not ns.smoke else ["attention"]
    L, mb = (128, 2) if tiny else (2048, 8)
    tt_extra = ["--vocab", "1024", "--set", "num_layers=2"] if tiny else []
    warm, steps = (1, 2) if tiny or ns.smoke else (3, 10)
    out_md = out / "train_throughput_gpu.md"
    throughput_sets = [cfg(c) for c in core] if not tiny else [ALL_TYPES_CONFIG]
    mqar_steps = 30 if tiny or ns.smoke else 400
    mqar = [py, "-m", "eval.mqar", "sweep", "--config", "smoke" if tiny else "paper", "--device", "auto",
            "--mixers", "attention,baseconv", "--steps", str(mqar_steps), "--out", str(tmp / "mqar.json"), "--quiet"]
    if not tiny:
        mqar += ["--seq-len", "256", "--kv-pairs", "16", "--d-model", "128", "--lrs", "2.1544347e-3"]
    out_stages = [
        {"name": "every_mixer", "cmd": _tt([ALL_TYPES_CONFIG], 128 if tiny else 512, 2, 1, 2, tmp / "every_mixer.json",
                                           every), "timeout": 240, "min_s": 30, "json": tmp / "every_mixer.json"},
        {"name": "throughput", "cmd": _tt(throughput_sets, L, mb, warm, steps, out / "train_throughput_gpu.json",
                                          tt_extra + ["--md", str(out_md), "--profile", str(out / "profile_gpu.txt"),
                                                      "--timeout", "150"]),
         "timeout": 420, "min_s": 60, "json": out / "train_throughput_gpu.json"},
        {"name": "fast_paths", "cmd": pytest + ["-k", "(cuda or flashfftconv) and not compiled", "--timeout", "120"],
         "timeout": 240, "min_s": 30, "log": out / "pytest_cuda.log"},
        {"name": "memory_plan", "cmd": [py, "-m", "bench.gpu_check", "--_plan", json.dumps(
            {"configs": throughput_sets, "seq_len": L, "micro_batch": mb, "extra": tt_extra})],
         "timeout": 180, "min_s": 20, "stdout_json": True},
        {"name": "mqar", "cmd": mqar, "timeout": 240, "min_s": 30, "json": tmp / "mqar.json"},
    ]
    if not ns.smoke:
        more = [cfg(c) for c in MORE_CONFIGS] if not tiny else [ALL_TYPES_CONFIG]
        out_stages += [
            {"name": "throughput_more", "optional": True, "json": tmp / "throughput_more.json",
             "cmd": _tt(more, L, mb, warm, steps, tmp / "throughput_more.json", tt_extra + ["--timeout", "150"]),
             "timeout": 400, "min_s": 90},
            {"name": "compile", "optional": True, "log": tmp / "pytest_compile.log",
             "cmd": pytest + ["-k", "compiled and cuda", "--timeout", "120"], "timeout": 300, "min_s": 60},
        ]
    if ns.stages:
        wanted = set(ns.stages.split(","))
        out_stages = [s for s in out_stages if s["name"] in wanted]
    return out_stages


def run_stage(stage: dict, remaining: float, log) -> dict:
    timeout = min(stage["timeout"], remaining)
    rec = {"name": stage["name"], "cmd": " ".join(stage["cmd"][1:]), "timeout_s": round(timeout)}
    log(f"\n===== stage {stage['name']} (limit {timeout:.0f} s)\n$ {rec['cmd']}\n")
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(stage["cmd"], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["status"] = "timeout" if rc is None else "ok" if rc == 0 else f"exit {rc}"
    text = (stdout if not stage.get("json") and not stage.get("stdout_json") else "") + stderr
    log(text[-20000:] if len(text) > 20000 else text)
    if stage.get("log"):
        Path(stage["log"]).write_text(stdout + stderr)
    if stage["name"] in ("fast_paths", "compile"):
        rec["pytest"] = pytest_summary(stdout)
    if stage.get("stdout_json") and rc == 0:
        rec["result"] = json.loads(stdout.strip().splitlines()[-1])
    if stage.get("json") and Path(stage["json"]).exists():
        rec["result"] = json.loads(Path(stage["json"]).read_text())
    if rc not in (0, None):
        rec["error_tail"] = "\n".join(stderr.strip().splitlines()[-15:])
    log(f"===== stage {stage['name']}: {rec['status']} in {rec['wall_s']} s\n")
    return rec


def pytest_summary(stdout: str) -> dict:
    """Counts from pytest's last line and the ids of failed tests."""
    counts = {}
    last = next((ln for ln in reversed(stdout.strip().splitlines()) if re.search(r"\d+ (passed|failed|skipped|error)", ln)), "")
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", last):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    counts["failed_tests"] = re.findall(r"^FAILED (\S+)", stdout, flags=re.M)
    counts["skipped_reasons"] = sorted(set(re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", stdout, flags=re.M)))
    return counts


# ----------------------------------------------------------------------------------------- memory plan

def plans(spec: dict) -> dict:
    """The dry-run memory plan of each config with the throughput stage's overrides (bytes)."""
    from bench.train_throughput import load_args, override_sets, parse as tt_parse
    from neox_zoology.training.dryrun import memory_summary

    out = {}
    for config in spec["configs"]:
        tt = tt_parse(["--bf16", "--micro-batch", str(spec["micro_batch"]), "--seq-len", str(spec["seq_len"]),
                       *spec["extra"]])
        args = load_args(config, override_sets(config, spec["seq_len"], tt, checkpoint=False))
        m = memory_summary(args)
        out[Path(config).stem] = {k: m[k] for k in ("peak", "runtime_reserve", "total", "transient", "activations",
                                                     "parameters", "gradients", "optimizer")}
    return out


def compare_memory(plan: dict, rows: list[dict]) -> list[dict]:
    """Measured peak vs plan per config: tensors (max allocated) against the plan's peak without its
    runtime reserve, and what the process held on the device against the whole plan."""
    out = []
    for r in rows:
        p = plan.get(r.get("name"))
        if p is None or r.get("error"):
            continue
        planned = p["peak"] - p["runtime_reserve"]
        got = r.get("gpu_peak_mem_bytes") or r.get("peak_mem_bytes")
        entry = {"config": r["name"], "planned_peak_bytes": p["peak"], "planned_tensors_bytes": planned,
                 "measured_allocated_bytes": got, "measured_reserved_bytes": r.get("gpu_peak_reserved_bytes"),
                 "device_used_bytes": r.get("gpu_device_used_bytes"),
                 "measured_over_planned": got / planned if got else None}
        entry["within_15pct"] = None if not got else abs(entry["measured_over_planned"] - 1) <= PLAN_MEASURED_TOLERANCE
        out.append(entry)
    return out


# -------------------------------------------------------------------------------------------- reports

def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    for mod in ("deepspeed", "megatron.core", "triton", "apex", "flashfftconv"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            env[mod] = getattr(m, "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            env[mod] = f"not importable: {type(exc).__name__}: {str(exc)[:120]}"
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                            "clocks.max.sm,power.limit", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        env["nvidia_smi"] = f"unavailable: {exc}"
    return env


def summary(report: dict) -> dict:
    """The headline numbers and targets, from the stage records."""
    by = {s["name"]: s for s in report["stages"]}
    out = {}
    tt = by.get("throughput", {}).get("result")
    more = by.get("throughput_more", {}).get("result")
    rows = (tt or {}).get("results", []) + (more or {}).get("results", [])
    out["throughput"] = [{k: r.get(k) for k in ("name", "tokens_per_s", "tflops", "mfu", "gpu_peak_mem_bytes",
                                                 "x_attention", "x_baseconv", "error")} for r in rows]
    out["targets"] = (tt or {}).get("targets", [])
    plan = by.get("memory_plan", {}).get("result")
    if plan and rows:
        out["memory"] = compare_memory(plan, rows)
    mq = by.get("mqar", {}).get("result")
    if mq:
        out["mqar"] = [{"cell": k, "accuracy": c["best_accuracy"], "seconds": c["seconds"],
                        "steps": c["runs"][0]["steps"], "device": c["runs"][0].get("device"),
                        "s_per_step": c["seconds"] / max(1, c["runs"][0]["steps"])}
                       for k, c in mq.get("cells", {}).items()]
    em = by.get("every_mixer", {}).get("result")
    if em and em.get("results"):
        r = em["results"][0]
        losses = (r.get("losses") or {})
        finite = all(x == x and abs(x) != float("inf") for x in losses.get("warmup", []) + losses.get("timed", []))
        out["every_mixer"] = {"layer_types": r.get("layer_types"), "losses": losses, "finite": finite and not r.get("error"),
                              "error": r.get("error")}
    fp = by.get("fast_paths", {}).get("pytest")
    if fp:
        out["fast_paths"] = fp
    return out


def _gb(v):
    return "-" if v is None else f"{v / 1e9:.2f}"


def markdown(report: dict) -> str:
    env, s = report["environment"], report.get("summary", {})
    lines = [f"# Device check ({report['mode']})", "",
             f"{env.get('gpu', 'no GPU')} (capability {env.get('capability', '-')}, "
             f"{_gb(env.get('gpu_memory_bytes'))} GB), torch {env['torch']} (CUDA {env.get('torch_cuda')}), "
             f"Python {env['python']}, deepspeed {env.get('deepspeed')}, megatron-core {env.get('megatron.core')}; "
             f"nvidia-smi: {env.get('nvidia_smi')}. Started {report['started']}, {report['wall_s']:.0f} s of "
             f"{report['budget_s']:.0f} s.", "",
             "| stage | status | wall s |", "|---|---|---:|"]
    for st in report["stages"]:
        extra = ""
        if st.get("pytest"):
            extra = " (" + ", ".join(f"{v} {k}" for k, v in st["pytest"].items() if isinstance(v, int)) + ")"
        lines.append(f"| {st['name']} | {st['status']}{extra} | {st.get('wall_s', '-')} |")
    if s.get("throughput"):
        lines += ["", "| config | tokens/s | TFLOP/s | MFU | peak allocated GB | x attention | x baseconv |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["throughput"]:
            if r.get("error"):
                lines.append(f"| {r['name']} | failed: {r['error'].splitlines()[0][:100]} | | | | | |")
                continue
            f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            lines.append(f"| {r['name']} | {f(r['tokens_per_s'], ',.0f')} | {f(r['tflops'], '.1f')} | "
                         f"{f(r['mfu'] and 100 * r['mfu'], '.1f')}% | {_gb(r['gpu_peak_mem_bytes'])} | "
                         f"{f(r['x_attention'], '.2f')} | {f(r['x_baseconv'], '.2f')} |")
    if s.get("targets"):
        lines += ["", "Targets:", ""] + [
            f"- {t['target']}: {t['value']:.3f} — {'met' if t['meets'] else 'missed' if t['meets'] is False else 'undecided'}"
            if t.get("value") is not None else f"- {t['target']}: undecided" for t in s["targets"]]
    if s.get("memory"):
        lines += ["", "| config | plan peak GB (tensors / with reserve) | measured allocated GB | reserved GB | "
                  "device used GB | measured / plan |", "|---|---|---:|---:|---:|---:|"]
        for m in s["memory"]:
            ratio = "-" if m["measured_over_planned"] is None else f"{m['measured_over_planned']:.3f}"
            lines.append(f"| {m['config']} | {_gb(m['planned_tensors_bytes'])} / {_gb(m['planned_peak_bytes'])} | "
                         f"{_gb(m['measured_allocated_bytes'])} | {_gb(m['measured_reserved_bytes'])} | "
                         f"{_gb(m['device_used_bytes'])} | {ratio} |")
    if s.get("mqar"):
        lines += ["", "| MQAR cell | accuracy | steps | s/step | device |", "|---|---:|---:|---:|---|"]
        for m in s["mqar"]:
            lines.append(f"| {m['cell']} | {m['accuracy']:.3f} | {m['steps']} | {m['s_per_step']:.4f} | {m['device']} |")
    if s.get("every_mixer"):
        e = s["every_mixer"]
        lines += ["", f"Every layer type in one bf16 model: losses {e['losses']}, finite: {e['finite']}"
                  + (f", error: {e['error'].splitlines()[0]}" if e.get("error") else "")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ns = parse(argv)
    if ns._plan:
        print(json.dumps(plans(json.loads(ns._plan))))
        return 0
    import torch

    if not torch.cuda.is_available() and not ns.rehearsal:
        print("gpu-check: no CUDA device visible to torch; on a machine without one, "
              "`python -m bench.gpu_check --rehearsal` runs the same stages at toy sizes", file=sys.stderr)
        return 2
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # stage outputs that do not go back: $OUT keeps 8 files
    log_path = out / "gpu_check.log"
    log_file = open(log_path, "a")

    def log(text: str) -> None:
        log_file.write(text)
        log_file.flush()
        for line in text.splitlines()[-3:] if len(text) > 300 else text.splitlines():
            print(line, file=sys.stderr, flush=True)

    mode = "smoke" if ns.smoke else "rehearsal" if ns.rehearsal else "full"
    t0 = time.perf_counter()
    report = {"check": "gpu_check", "mode": mode, "budget_s": ns.budget_s,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment(), "stages": []}
    log(f"gpu-check ({mode}): {json.dumps(report['environment'])}\n")

    def save():
        report["wall_s"] = time.perf_counter() - t0
        report["summary"] = summary(report)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "gpu_check.md").write_text(markdown(report))

    save()
    for stage in stages(ns, out, tmp):
        remaining = ns.budget_s - (time.perf_counter() - t0)
        if remaining < stage["min_s"]:
            report["stages"].append({"name": stage["name"], "status": "skipped (budget)", "wall_s": 0})
            log(f"===== stage {stage['name']}: skipped, {remaining:.0f} s left of the budget\n")
            save()
            continue
        report["stages"].append(run_stage(stage, remaining, log))
        save()
    save()
    log_file.close()
    print(markdown(report), flush=True)
    failed = [s["name"] for s in report["stages"]
              if not s["status"].startswith(("ok", "skipped")) and not (s["status"] == "exit 1" and s.get("pytest"))]
    failed_tests = [t for s in report["stages"] for t in (s.get("pytest") or {}).get("failed_tests", [])]
    if failed or failed_tests:
        print(f"gpu-check: failed stages: {failed}; failed tests: {failed_tests}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
