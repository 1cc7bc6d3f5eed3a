"""`python -m neox_zoology.generate CONFIG... --load CKPT (--prompt TEXT | --input-file F.jsonl | --interactive)`

Text generation from a checkpoint (any TP / PP layout) or an export, in one process (GPT-NeoX's
generate.py modes). The model comes from the checkpoint; CONFIG supplies the tokenizer (tokenizer_type,
vocab_file, merge_file; the checkpoint's own config when CONFIG has none). Prompts are batched; each row
stops at end-of-document or --max-tokens. An empty prompt starts from end-of-document (unconditional).
Tokens/s of the decoding phase go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m neox_zoology.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="YAML files naming the tokenizer (e.g. the run's config)")
    p.add_argument("--load", required=True, help="save directory, global_step<N> directory or export directory")
    p.add_argument("--override", action="append", default=[], metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    mode.add_argument("--input-file", help="JSONL: one prompt per line ({\"prompt\": ...} or a JSON string)")
    mode.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--output-file", help="JSONL results (default: print the texts)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    return p.parse_args(argv)


def tokenizer_for(ns, model):
    from neox_zoology.config import merge_files
    from neox_zoology.tokenizer import build_tokenizer

    raw, _ = merge_files(ns.configs, ns.override, ns.sets)
    keys = ("tokenizer_type", "vocab_file", "merge_file")
    src = raw if raw.get("tokenizer_type") or raw.get("vocab_file") else model.raw_config
    tok = build_tokenizer(src.get("tokenizer_type") or "GPT2BPETokenizer", *(src.get(k) for k in keys[1:]))
    if tok.vocab_size > model.args.padded_vocab_size:
        raise ValueError(f"the tokenizer ({src.get('vocab_file')}) has {tok.vocab_size} ids, the model "
                         f"{model.args.padded_vocab_size}: use the tokenizer the checkpoint was trained with")
    return tok


def read_prompts(path: str) -> list[str]:
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc}); write one {{\"prompt\": ...}} per line") from None
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: no \"prompt\" string; write one {{\"prompt\": ...}} per line")
            prompts.append(text)
    return prompts


def run_prompts(model, tok, texts: list[str], ns, out) -> float:
    """Generate for `texts` in batches; write results; return decode tokens/s."""
    from neox_zoology.inference.sampling import Sampling, generate

    cfg = Sampling(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, max_tokens=ns.max_tokens,
                   eod=tok.eod, seed=ns.seed)
    new, seconds = 0, 0.0
    for i in range(0, len(texts), ns.batch_size):
        batch = texts[i:i + ns.batch_size]
        ids = [tok.encode(t) or [tok.eod] for t in batch]
        gen = generate(model, ids, cfg)
        new, seconds = new + gen.new_tokens, seconds + gen.decode_seconds
        for text, tokens, stopped, truncated in zip(batch, gen.tokens, gen.stopped, gen.truncated):
            body = tokens[:-1] if stopped else tokens
            record = {"prompt": text, "text": tok.decode(body), "tokens": tokens, "stopped_on_eod": stopped,
                      "reached_context_limit": truncated}
            if out is not None:
                out.write(json.dumps(record) + "\n")
            else:
                print(text + record["text"], flush=True)
    return new / seconds if seconds > 0 else 0.0


def main(argv=None) -> int:
    ns = parse(argv)
    from neox_zoology import inference

    try:
        model = inference.load(ns.load)
        tok = tokenizer_for(ns, model)
        if ns.interactive:
            print("prompt (empty line or end of input quits):", file=sys.stderr, flush=True)
            rate = 0.0
            for line in sys.stdin:
                if not line.strip():
                    break
                rate = run_prompts(model, tok, [line.rstrip("\n")], ns, None)
                print(f"[{rate:,.1f} tokens/s]", file=sys.stderr, flush=True)
            return 0
        texts = ns.prompt if ns.prompt else read_prompts(ns.input_file)
        out = open(ns.output_file, "w") if ns.output_file else None
        try:
            rate = run_prompts(model, tok, texts, ns, out)
        finally:
            if out is not None:
                out.close()
    except (ValueError, inference.LoadError, OSError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    print(f"generated for {len(texts)} prompt(s): {rate:,.1f} tokens/s (decode, batch {ns.batch_size})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
