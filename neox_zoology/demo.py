"""`make demo`: train the CPU demo hybrid on 2 local CPU ranks through the real `deepspeed` launcher.

Prints the first and last training loss, the checkpoint path, the throughput and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/neox/demo_cpu.yml")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--set", action="append", default=[], dest="sets", help="forwarded to train.py")
    ns = p.parse_args(argv)

    run_dir = Path(ns.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run every time: the demo shows training from scratch
    summary = run_dir / "summary.json"
    launcher = shutil.which("deepspeed")
    if launcher is None:
        print("deepspeed launcher not found on PATH; run `make demo` (it uses .venv/bin)", file=sys.stderr)
        return 2
    cmd = [launcher, "--num_gpus", str(ns.ranks), "train.py", ns.config,
           "--set", f"save={run_dir}/checkpoints", "--set", f"tensorboard_dir={run_dir}/tensorboard",
           "--summary-json", str(summary)]
    for s in ns.sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # several ranks on few cores: one thread each
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"demo failed (exit {rc})", file=sys.stderr)
        return rc
    s = json.loads(summary.read_text())
    print()
    print(f"demo finished in {wall:.0f} s on {ns.ranks} CPU ranks")
    print(f"  first loss      {s['first_loss']:.4f}")
    print(f"  last loss       {s['last_loss']:.4f}")
    if s["valid_losses"]:
        print(f"  validation loss {s['valid_losses'][-1][1]:.4f} at iteration {s['valid_losses'][-1][0]}")
    print(f"  throughput      {s['tokens_per_s']:,.0f} tokens/s")
    print(f"  checkpoint      {s['checkpoint']}")
    print(f"  tensorboard     {run_dir}/tensorboard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
