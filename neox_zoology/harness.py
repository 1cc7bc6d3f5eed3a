"""`python -m neox_zoology.harness CONFIG... --load CKPT --tasks T1,T2 [--include-path DIR]`

lm-evaluation-harness over a checkpoint (any TP / PP layout) or an export, in one process (GPT-NeoX's
eval.py). `ZooLM` is an `lm_eval` LM: loglikelihood (right-padded batches: every layer is causal in
evaluation, so padding after a row changes none of its positions), loglikelihood_rolling (disjoint windows
of the model's seq_length) and generate_until (the decoder's prefill / step). CONFIG supplies the tokenizer
as for neox_zoology.generate. Needs the `eval` extra (`pip install -e '.[eval]'`, lm-eval from PyPI).
"""
from __future__ import annotations

import argparse
import json
import sys

try:
    from lm_eval.api.model import LM
except ImportError:  # the optional `eval` extra is not installed: the CLI says so in one line
    LM = object


class ZooLM(LM):
    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        if LM is object:
            raise ImportError("lm-eval is not installed: pip install -e '.[eval]' (or pip install lm-eval)")
        super().__init__()
        self.model, self.tok, self.batch_size = model, tokenizer, int(batch_size)
        limits = [n for n in (max_length, model.args.seq_length, model.context_limit) if n]
        self.max_length = min(limits)

    # -- scoring
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:  # the space belongs to the continuation's first token, as lm-eval's own models do it
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.tok.encode(context) if context else [self.tok.eod]
        return ctx, self.tok.encode(continuation)

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of the continuation's log-probabilities, all of it greedy)."""
        import torch

        out = []
        for i in range(0, len(pairs), self.batch_size):
            batch = [(c + x)[-(self.max_length + 1):] for c, x in pairs[i:i + self.batch_size]]
            conts = [x for _, x in pairs[i:i + self.batch_size]]
            width = max(len(b) for b in batch) - 1
            inputs = torch.tensor([b[:-1] + [self.tok.eod] * (width - len(b) + 1) for b in batch])
            logp = self.model(inputs)[..., :self.model.vocab_size].float().log_softmax(-1)
            for row, (seq, cont) in enumerate(zip(batch, conts)):
                n = len(cont)
                pos = torch.arange(len(seq) - 1 - n, len(seq) - 1)
                target = torch.tensor(seq[-n:])
                lp = logp[row, pos]
                out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(r.args[0]), self.tok.eod, self.max_length, 1)]
            out.append(sum(ll for ll, _ in self.score(windows)))
        return out

    def generate_until(self, requests) -> list[str]:
        from neox_zoology.inference.sampling import Sampling, generate

        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = (self.tok.encode(context) or [self.tok.eod])[-(self.max_length - 1):]
            room = self.max_length - len(ids)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            cfg = Sampling(temperature=temperature, max_tokens=max(1, min(int(kwargs.get("max_gen_toks", 256)), room)),
                           eod=self.tok.eod)
            tokens = generate(self.model, [ids], cfg).tokens[0]
            text = self.tok.decode(tokens[:-1] if tokens and tokens[-1] == self.tok.eod else tokens)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m neox_zoology.harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="YAML files naming the tokenizer (e.g. the run's config)")
    p.add_argument("--load", required=True, help="save directory, global_step<N> directory or export directory")
    p.add_argument("--override", action="append", default=[], metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", action="append", default=[], help="a folder of task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, help="results JSON")
    return p.parse_args(argv)


def evaluate(model, tokenizer, tasks: list[str], include_path=(), num_fewshot=None, limit=None, batch_size=8) -> dict:
    """lm-eval's simple_evaluate over `model`; the results dict (task -> metric -> value) and the configs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(include_path), include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # lm-eval's own tasks too (slower)
        manager = TaskManager(include_path=list(include_path) or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; give --include-path for local task YAMLs "
                         f"or a task lm-eval knows (lm-eval ls tasks)")
    res = lm_eval.simple_evaluate(model=ZooLM(model, tokenizer, batch_size), tasks=tasks, task_manager=manager,
                                  num_fewshot=num_fewshot, limit=limit, log_samples=False, bootstrap_iters=0)
    return {"results": res["results"], "configs": res.get("configs", {}), "n-samples": res.get("n-samples", {})}


def main(argv=None) -> int:
    ns = parse(argv)
    from neox_zoology import inference
    from neox_zoology.generate import tokenizer_for

    if LM is object:
        print("harness: lm-eval is not installed: pip install -e '.[eval]' (or pip install lm-eval)", file=sys.stderr)
        return 2
    try:
        model = inference.load(ns.load)
        res = evaluate(model, tokenizer_for(ns, model), [t for t in ns.tasks.split(",") if t], ns.include_path,
                       ns.num_fewshot, ns.limit, ns.batch_size)
    except (ValueError, inference.LoadError, OSError) as exc:
        print(f"harness: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(res, indent=1, default=str)
    if ns.output:
        from neox_zoology.io import atomic_write_text

        atomic_write_text(ns.output, text + "\n")
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
