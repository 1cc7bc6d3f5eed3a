"""`make demo`: train the CPU demo hybrid on 2 local CPU ranks through the real `deepspeed` launcher.

Prints the first and last training loss, the checkpoint path, the throughput and the wall time, then
the AR-slice summary of the final checkpoint: the training bigram counts of the demo corpus are built
first (data/demo/bigrams_train.npz, by tokenization.bigrams over the training documents of the config's
split), the after-checkpoint evaluation is switched on with `--set ar_eval=...`, and when the checkpoint
has no ar_slice.json the standalone evaluation (`python -m eval.ar_slice`) computes it.

The AR slice is read against the same run's per-frequency curves (`eval.ar_slice.frequency_matched`):
at demo scale the model does not recall from its context yet, so AR hits score like other tokens of
the same bigram frequency, and the overall "AR hits worse than other tokens" only reflects that AR
hits are rarer bigrams -- not the paper's finding. The contrast that is real at this scale comes last:
two MQAR runs (L 64, 4 key-value pairs, d 64, 600 steps; the `cpu` sweep's settings and learning rates,
one process each), BaseConv alone against BaseConv with attention as its second layer (`--no-mqar`
skips them).
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
    p.add_argument("--no-mqar", action="store_true", help="skip the closing MQAR contrast")
    ns = p.parse_args(argv)

    run_dir = Path(ns.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run every time: the demo shows training from scratch
    summary = run_dir / "summary.json"
    bigrams = _demo_bigram_counts(ns.config)
    launcher = shutil.which("deepspeed")
    if launcher is None:
        print("deepspeed launcher not found on PATH; run `make demo` (it uses .venv/bin)", file=sys.stderr)
        return 2
    cmd = [launcher, "--num_gpus", str(ns.ranks), "train.py", ns.config,
           "--set", f"save={run_dir}/checkpoints", "--set", f"tensorboard_dir={run_dir}/tensorboard",
           "--summary-json", str(summary)]
    if bigrams:
        cmd += ["--set", f"ar_eval={{enabled: true, bigram_counts: {bigrams}, iters: 10}}"]
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
    if bigrams and s["checkpoint"]:
        rc = _ar_slice_summary(Path(s["checkpoint"]), bigrams, env)
        if rc:
            return rc
    if not ns.no_mqar:
        _mqar_contrast(ns.ranks)
    return 0


def _demo_bigram_counts(config: str) -> str | None:
    """The AR slice's bigram counts for the demo corpus (data/demo/bigrams_train.npz), made when missing or
    made for other data: `python -m tokenization.bigrams` over the training documents of the config's
    `split`, for the bigrams of its validation documents (the ones the evaluation scores)."""
    from eval import ar_slice
    from neox_zoology.config import ConfigError, load
    from tokenization import bigrams
    from neox_zoology.tokenizer import tokenizer_identity
    from neox_zoology.tokenizer import build_tokenizer

    try:
        args = load([config], world_size=1)
        tok = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"AR-slice evaluation skipped: {exc}", file=sys.stderr)
        return None
    if not args.data_path:
        return None
    out = Path(args.data_path).parent / "bigrams_train.npz"
    identity = tokenizer_identity(tok)
    try:
        train, valid, _ = bigrams.split_documents(args.data_path, args.split)
        if train is None or valid is None:
            raise bigrams.BigramCountsError(f"split {args.split!r} leaves no training or no validation documents")
        if not _counts_are_for(out, identity, [train], [valid]):
            counts = bigrams.count_bigrams([train], [valid], tokenizer=identity)
            bigrams.save_bigram_counts(out, counts)
    except (bigrams.BigramCountsError, ar_slice.ARSliceError) as exc:
        print(f"AR-slice evaluation skipped: {exc}", file=sys.stderr)
        return None
    return str(out)


def _counts_are_for(path: Path, identity: dict, train: list, valid: list) -> bool:
    """Whether the counts file at `path` was made with this tokenizer for exactly these documents as they are now."""
    from eval import ar_slice
    from tokenization import bigrams

    try:
        counts = ar_slice.load_bigram_counts(path, expected_vocab_size=identity["vocab_size"],
                                             expected_tokenizer=identity)
    except ar_slice.ARSliceError:  # missing, or counted with another tokenizer
        return False
    return (counts.train_parts == train and counts.eval_parts == valid and counts.max_train_tokens is None
            and counts.train_tokens == sum(bigrams.dataset_info(d).tokens for d in train)
            and counts.eval_tokens == sum(bigrams.dataset_info(d).tokens for d in valid))


def _ar_slice_summary(ckpt: Path, bigrams: str, env: dict) -> int:
    from eval import ar_slice

    result = ckpt / "ar_slice.json"
    if not result.exists():  # the training loop did not run the hook: evaluate the checkpoint standalone
        cmd = [sys.executable, "-m", "eval.ar_slice", str(ckpt / "configs" / "config.yml"), "--load", str(ckpt),
               "--out", str(result), "--bigram-counts", bigrams, "--set", "tensorboard_dir=null"]
        rc = subprocess.call(cmd, env=env, stdout=subprocess.DEVNULL)
        if rc != 0 or not result.exists():
            print(f"AR-slice evaluation of {ckpt} failed (exit {rc}): {' '.join(cmd)}", file=sys.stderr)
            return rc or 1
    doc = json.loads(result.read_text())
    print()
    print(ar_slice.format_summary(doc))
    print(f"  results         {result} (plot: {result.with_suffix('.png').name})")
    print(reading(doc))
    return 0


def reading(doc: dict) -> str:
    """What the demo's AR slice does and does not show, from its per-frequency curves."""
    from eval import ar_slice

    m = ar_slice.frequency_matched(doc)
    if m is None:
        return "  reading         no frequency bucket holds both AR hits and other tokens"
    lines = []
    if m["unseen"]:
        u = m["unseen"]
        lines.append(f"  unseen bigrams  AR hits {u['ar_hits_nll']:.2f} nats ({u['ar_hits_tokens']:,} tokens) vs other "
                     f"tokens {u['other_nll']:.2f} nats ({u['other_tokens']:,}): bigrams never seen in training, "
                     f"predictable only by recalling the context")
    lines.append(f"  matched gap     AR hits {m['matched_gap']:+.2f} nats vs other tokens of the same bigram frequency "
                 f"(over {m['ar_hits_matched']:,} AR hits)")
    if m["matched_gap"] > ar_slice.RECALL_GAP:
        lines.append("  reading         at this scale the model does not recall from its context yet: AR hits score "
                     "like other tokens of their frequency, so 'AR hits worse than other tokens' above only "
                     "says AR hits are rarer bigrams. It is not the paper's finding (360M models, 10B tokens); "
                     "the MQAR runs below show the recall gap that is real at this size.")
    else:
        lines.append("  reading         AR hits score better than other tokens of their frequency: the model "
                     "recalls from its context.")
    return "\n".join(lines)


MQAR_CONTRAST = {"seq_len": 64, "kv": 4, "d_model": 64, "steps": 600,
                 "runs": [("baseconv", 3e-3), ("baseconv+attention", 1e-3)]}


def _mqar_run(item):
    import torch

    from eval.mqar import configs
    from eval.mqar.sweep import train_one

    pattern, lr = item
    torch.set_num_threads(1)
    cfg = configs.get("cpu")
    cfg["steps"] = {str(MQAR_CONTRAST["seq_len"]): MQAR_CONTRAST["steps"]}
    return pattern, train_one(cfg, pattern, MQAR_CONTRAST["seq_len"], MQAR_CONTRAST["kv"], MQAR_CONTRAST["d_model"], lr)


def _mqar_contrast(workers: int) -> None:
    import multiprocessing as mp

    c = MQAR_CONTRAST
    print()
    print(f"MQAR (L {c['seq_len']}, {c['kv']} key-value pairs, d {c['d_model']}, {c['steps']} steps, 2 layers, no MLP):",
          flush=True)
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(max(1, min(workers, len(c["runs"])))) as pool:
        results = pool.map(_mqar_run, c["runs"])
    acc = {}
    for pattern, r in results:
        acc[pattern] = r["accuracy"]
        print(f"  {pattern:<20} test accuracy {100 * r['accuracy']:.1f}% (lr {r['lr']:g}, {r['steps']} steps)")
    diff = 100 * (acc["baseconv+attention"] - acc["baseconv"])
    print(f"  contrast        attention as the second layer: {diff:+.1f} points of keys recalled "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
