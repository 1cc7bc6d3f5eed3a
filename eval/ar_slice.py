"""The associative-recall (AR) slice of validation tokens (Zoology §3.1, Table 1, Figure 1, Appendix C.1).

A token x_t is an *AR hit* when the bigram (x_{t-1}, x_t) already occurred earlier in the same context
and occurred at most `threshold` times in the training data (the paper: 1,250 over 10B tokens); every
other scored token is *other*. The mask is causal: whether x_t is a hit depends on x_0..x_t only.

Per evaluated token we accumulate float64 sums (no logits leave the model, only per-token NLL):
overall / AR hits / other NLL and counts, NLL by bigram training frequency (log2 buckets, AR hits and
other tokens separately: Figure 1) and, for AR hits, by recall distance (positions since the bigram's
previous occurrence, log2 buckets: Figure 3). Sums add across batches and ranks, so DP/TP/PP runs
all-reduce one small vector. Gap attribution (Appendix C.1), with ρ the AR-hit fraction, ℓ the mean
NLL, m the evaluated model and a the attention reference: share = ρ · (ℓ_m^AR − ℓ_a^AR) / (ℓ_m − ℓ_a),
and, as in the paper, 100% when m beats attention both overall and on AR hits.

Training counts come from `python -m tokenization.bigrams` (docs/data.md; `load_bigram_counts` below
adds the run's checks). A bigram the counts file does not hold counts as never seen in training and is
reported in `bigrams_not_in_counts`. Standalone: `python -m eval.ar_slice CONFIG... --load CKPT
[--iteration N] --out results.json` (eval/standalone.py; under `deepspeed` for TP/PP checkpoints).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neox_zoology.tokenizer import as_identity, identity_id, same_tokenizer
from tokenization import bigrams
from tokenization.bigrams import BigramCounts

DEFAULT_THRESHOLD = 1250
FREQ_BUCKETS = 41  # 0: never seen in training; k >= 1: counts in [2^(k-1), 2^k)
DIST_BUCKETS = 32  # k: distance in [2^k, 2^(k+1))
SLICES = ("all", "ar_hits", "other")


class ARSliceError(ValueError):
    """A problem with the AR-slice inputs (bigram-count file, vocabulary, reference run), phrased for the user."""


# ----------------------------------------------------------------------------- bigram training counts

_BUILD = "python -m tokenization.bigrams"


def load_bigram_counts(path, expected_vocab_size: int | None = None, expected_tokenizer=None,
                       key: str = "ar_eval.bigram_counts") -> BigramCounts:
    """Read the counts file of `python -m tokenization.bigrams` and check it fits the run.

    tokenization.bigrams.load_bigram_counts reads and checks the file itself; this adds the run's
    checks, phrased for the config key `key`: the vocabulary size of the model's tokenizer
    (`expected_vocab_size`, not the padded embedding size) and its identity (`expected_tokenizer`: a
    Tokenizer, whose files are hashed, an identity dict or a tokenizer_id string).
    """
    if not path or not Path(path).exists():
        raise ARSliceError(
            f"{key}: bigram-count file {path if path else '(not set)'} not found; build it from the training "
            f"data with the same tokenizer ({_BUILD}) and set {key} to its path"
        )
    try:
        counts = bigrams.load_bigram_counts(path)
    except bigrams.BigramCountsError as exc:
        raise ARSliceError(f"{key}: {exc}") from None
    if expected_vocab_size is not None and counts.vocab_size != int(expected_vocab_size):
        raise ARSliceError(
            f"{key}: {path} counts bigrams over a vocabulary of {counts.vocab_size} tokens but the model's "
            f"tokenizer has {expected_vocab_size}; rebuild the counts with this run's tokenizer ({_BUILD}; the "
            f"file was counted with {counts.tokenizer_id})"
        )
    if expected_tokenizer is not None:
        if isinstance(expected_tokenizer, str):
            same, want = expected_tokenizer == counts.tokenizer_id, expected_tokenizer
        else:
            identity = as_identity(expected_tokenizer)
            same, want = same_tokenizer(counts.tokenizer, identity), identity_id(identity)
        if not same:
            raise ARSliceError(
                f"{key}: {path} was counted with tokenizer {counts.tokenizer_id!r} (files "
                f"{counts.tokenizer['files']}), this run uses {want!r}; rebuild the counts with this run's "
                f"tokenizer ({_BUILD})"
            )
    return counts


# ----------------------------------------------------------------------------- masks


def previous_occurrence(keys: np.ndarray) -> np.ndarray:
    """For each position t of each row, the latest j < t with keys[j] == keys[t], or -1."""
    keys = np.atleast_2d(keys)
    order = np.argsort(keys, axis=1, kind="stable")  # equal keys stay in position order
    sk = np.take_along_axis(keys, order, axis=1)
    same = np.zeros(keys.shape, dtype=bool)
    same[:, 1:] = sk[:, 1:] == sk[:, :-1]
    prev_sorted = np.full(keys.shape, -1, dtype=np.int64)
    prev_sorted[:, 1:] = np.where(same[:, 1:], order[:, :-1], -1)
    prev = np.empty_like(prev_sorted)
    np.put_along_axis(prev, order, prev_sorted, axis=1)
    return prev


@dataclass
class TokenSlices:
    """Per scored position t (the prediction of x_{t+1} from x_0..x_t), shape [batch, L]."""

    ar_hit: np.ndarray  # bool
    repeated: np.ndarray  # bool: the bigram occurred earlier in the context (any training frequency)
    train_count: np.ndarray  # int64: training count of the bigram (x_t, x_{t+1})
    distance: np.ndarray  # int64: positions since the bigram's previous occurrence (0 when not repeated)
    known: np.ndarray | None = None  # bool: the bigram is in the count table


def token_slices(tokens: np.ndarray, labels: np.ndarray, counts: BigramCounts,
                 threshold: int = DEFAULT_THRESHOLD) -> TokenSlices:
    """AR-hit mask and bigram facts for next-token prediction: `labels[:, t]` is the token after `tokens[:, t]`.

    The context of label t is x_0..x_{t+1} with x = tokens[:, 0], labels[:, 0..]: the bigram ending at
    the label is (tokens[:, t], labels[:, t]); it is repeated when the same pair ends at an earlier label.
    """
    tokens = np.atleast_2d(np.asarray(tokens, dtype=np.int64))
    labels = np.atleast_2d(np.asarray(labels, dtype=np.int64))
    if tokens.shape != labels.shape:
        raise ValueError(f"tokens {tokens.shape} and labels {labels.shape} differ in shape")
    V = counts.vocab_size
    hi = max(int(tokens.max(initial=0)), int(labels.max(initial=0)))
    if hi >= V or min(int(tokens.min(initial=0)), int(labels.min(initial=0))) < 0:
        raise ARSliceError(
            f"ar_eval.bigram_counts: token id {hi} is outside the {V}-token vocabulary of {counts.path or 'the counts'}; "
            f"the counts were built with another tokenizer: rebuild them with this run's tokenizer"
        )
    keys = tokens * V + labels
    prev = previous_occurrence(keys)
    repeated = prev >= 0
    train, known = bigrams.lookup_keys(counts, keys)
    hit = repeated & (train <= threshold)
    pos = np.arange(keys.shape[1])[None, :]
    distance = np.where(repeated, pos - prev, 0)
    return TokenSlices(hit, repeated, train, distance, known)


def freq_bucket(count: np.ndarray) -> np.ndarray:
    c = np.asarray(count, dtype=np.int64)
    b = np.zeros(c.shape, dtype=np.int64)
    pos = c > 0
    b[pos] = np.floor(np.log2(c[pos])).astype(np.int64) + 1
    return np.minimum(b, FREQ_BUCKETS - 1)


def dist_bucket(distance: np.ndarray) -> np.ndarray:
    d = np.maximum(np.asarray(distance, dtype=np.int64), 1)
    return np.minimum(np.floor(np.log2(d)).astype(np.int64), DIST_BUCKETS - 1)


def freq_bucket_range(k: int) -> tuple[int, int | None]:
    if k == 0:
        return 0, 0
    if k == FREQ_BUCKETS - 1:
        return 2 ** (k - 1), None
    return 2 ** (k - 1), 2 ** k - 1


# ----------------------------------------------------------------------------- accumulation


@dataclass
class SliceSums:
    """Float64 sums of NLL and token counts per slice and bucket (add across batches and ranks)."""

    nll: np.ndarray = field(default_factory=lambda: np.zeros(3))  # all, ar_hits, other
    n: np.ndarray = field(default_factory=lambda: np.zeros(3))
    freq_nll: np.ndarray = field(default_factory=lambda: np.zeros((2, FREQ_BUCKETS)))  # [ar_hits|other, bucket]
    freq_n: np.ndarray = field(default_factory=lambda: np.zeros((2, FREQ_BUCKETS)))
    dist_nll: np.ndarray = field(default_factory=lambda: np.zeros(DIST_BUCKETS))  # AR hits by recall distance
    dist_n: np.ndarray = field(default_factory=lambda: np.zeros(DIST_BUCKETS))
    unknown: np.ndarray = field(default_factory=lambda: np.zeros(1))  # scored tokens whose bigram is not in the table

    _FIELDS = ("nll", "n", "freq_nll", "freq_n", "dist_nll", "dist_n", "unknown")

    def add(self, nll: np.ndarray, s: TokenSlices, loss_mask: np.ndarray | None = None) -> None:
        nll = np.asarray(nll, dtype=np.float64)
        w = np.ones(nll.shape) if loss_mask is None else (np.asarray(loss_mask, dtype=np.float64) > 0).astype(np.float64)
        hit = s.ar_hit.astype(np.float64) * w
        other = (1.0 - s.ar_hit) * w
        self.nll += [float((nll * w).sum()), float((nll * hit).sum()), float((nll * other).sum())]
        self.n += [float(w.sum()), float(hit.sum()), float(other.sum())]
        fb = freq_bucket(s.train_count).ravel()
        for row, m in ((0, hit.ravel()), (1, other.ravel())):
            self.freq_nll[row] += np.bincount(fb, weights=nll.ravel() * m, minlength=FREQ_BUCKETS)
            self.freq_n[row] += np.bincount(fb, weights=m, minlength=FREQ_BUCKETS)
        db = dist_bucket(s.distance).ravel()
        self.dist_nll += np.bincount(db, weights=nll.ravel() * hit.ravel(), minlength=DIST_BUCKETS)
        self.dist_n += np.bincount(db, weights=hit.ravel(), minlength=DIST_BUCKETS)
        if s.known is not None:
            self.unknown += float((w * ~s.known).sum())

    def vector(self) -> np.ndarray:
        return np.concatenate([getattr(self, f).ravel() for f in self._FIELDS])

    @classmethod
    def from_vector(cls, v: np.ndarray) -> "SliceSums":
        out, i = cls(), 0
        for f in cls._FIELDS:
            a = getattr(out, f)
            a[...] = np.asarray(v[i:i + a.size], dtype=np.float64).reshape(a.shape)
            i += a.size
        return out

    def __iadd__(self, other: "SliceSums") -> "SliceSums":
        for f in self._FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self


def _stat(nll_sum: float, n: float) -> dict:
    if n <= 0:
        return {"tokens": 0, "nll": None, "ppl": None}
    mean = nll_sum / n
    return {"tokens": int(round(n)), "nll": mean, "ppl": math.exp(min(mean, 700.0))}


def summarize(sums: SliceSums, threshold: int = DEFAULT_THRESHOLD, **meta) -> dict:
    """The ar_slice.json document (means, perplexities, buckets and the raw sums for exact merging)."""
    out = {**meta, "threshold": threshold}
    for i, name in enumerate(SLICES):
        out[name] = _stat(sums.nll[i], sums.n[i])
    out["ar_hit_fraction"] = float(sums.n[1] / sums.n[0]) if sums.n[0] > 0 else None
    out["bigrams_not_in_counts"] = int(round(sums.unknown[0]))
    out["by_frequency"] = []
    for k in range(FREQ_BUCKETS):
        if sums.freq_n[:, k].sum() == 0:
            continue
        lo, hi = freq_bucket_range(k)
        out["by_frequency"].append({"min_count": lo, "max_count": hi,
                                    "ar_hits": _stat(sums.freq_nll[0, k], sums.freq_n[0, k]),
                                    "other": _stat(sums.freq_nll[1, k], sums.freq_n[1, k])})
    out["by_distance"] = []
    for k in range(DIST_BUCKETS):
        if sums.dist_n[k] == 0:
            continue
        out["by_distance"].append({"min_distance": 2 ** k, "max_distance": 2 ** (k + 1) - 1,
                                   **_stat(sums.dist_nll[k], sums.dist_n[k])})
    out["sums"] = sums.vector().tolist()
    return out


# ----------------------------------------------------------------------------- gap attribution


def gap_attribution(model: dict, reference: dict) -> dict:
    """Share of the overall NLL gap to `reference` (attention) explained by AR hits (Appendix C.1).

    share = ρ_m · (ℓ_m^AR − ℓ_a^AR) / (ℓ_m − ℓ_a); 1.0 when the model is better than the reference both
    overall and on AR hits (the paper's convention); None when the overall gap is exactly zero. In the
    remaining sign cases the formula's value is reported as is (it can be negative or above 1).
    """
    for name, doc in (("model", model), ("reference", reference)):
        for key in ("all", "ar_hits"):
            if doc.get(key, {}).get("nll") is None:
                raise ARSliceError(f"gap attribution: the {name} results have no {key} tokens; evaluate more batches")
    lm, la = model["all"]["nll"], reference["all"]["nll"]
    lm_ar, la_ar = model["ar_hits"]["nll"], reference["ar_hits"]["nll"]
    rho = model["ar_hit_fraction"]
    gap, ar_gap = lm - la, lm_ar - la_ar
    if gap < 0 and ar_gap < 0:
        share, case = 1.0, "better than the reference overall and on AR hits: 100% by convention"
    elif gap == 0:
        share, case = None, "no overall gap"
    else:
        share = rho * ar_gap / gap
        case = "formula"
    return {"share": share, "case": case, "overall_nll_gap": gap, "ar_hits_nll_gap": ar_gap, "ar_hit_fraction": rho,
            "overall_ppl": [model["all"]["ppl"], reference["all"]["ppl"]],
            "ar_hits_ppl": [model["ar_hits"]["ppl"], reference["ar_hits"]["ppl"]]}


def read_reference(path, key: str = "ar_eval.reference") -> dict:
    """A reference run's ar_slice.json: a file, a checkpoint directory (global_stepN) or a save directory."""
    p = Path(path)
    if p.is_dir():
        if (p / "ar_slice.json").exists():
            p = p / "ar_slice.json"
        elif (p / "latest").exists():
            p = p / (p / "latest").read_text().strip() / "ar_slice.json"
        else:
            steps = sorted(p.glob("global_step*/ar_slice.json"), key=lambda q: int(q.parent.name[len("global_step"):]))
            if steps:
                p = steps[-1]
    if not p.is_file():
        raise ARSliceError(f"{key}: {path}: no ar_slice.json there; give the ar_slice.json of an evaluated attention run")
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise ARSliceError(f"{key}: {p} is not valid JSON ({exc})") from None


def frequency_matched(doc: dict) -> dict | None:
    """AR hits against other tokens of the same bigram training frequency (the per-frequency curves).

    `unseen`: mean NLL of AR hits and of other tokens whose bigram never occurred in training (count 0).
    `matched_gap`: the AR hits' NLL minus the other tokens' NLL in the same frequency bucket, averaged
    over the AR hits (buckets holding both). A model that recalls from its context predicts an AR hit
    far better than another token of equal training frequency (negative gap); without recall the gap
    is ~0, and the overall AR-hit perplexity differs from the other tokens' only through how AR hits
    are spread over frequencies. None when no bucket holds both.
    """
    rows = [b for b in doc.get("by_frequency", []) if b["ar_hits"]["tokens"] and b["other"]["tokens"]]
    if not rows:
        return None
    n = sum(b["ar_hits"]["tokens"] for b in rows)
    gap = sum(b["ar_hits"]["tokens"] * (b["ar_hits"]["nll"] - b["other"]["nll"]) for b in rows) / n
    zero = next((b for b in rows if b["max_count"] == 0), None)
    unseen = None if zero is None else {"ar_hits_nll": zero["ar_hits"]["nll"], "ar_hits_tokens": zero["ar_hits"]["tokens"],
                                        "other_nll": zero["other"]["nll"], "other_tokens": zero["other"]["tokens"]}
    return {"matched_gap": gap, "ar_hits_matched": n, "unseen": unseen}


RECALL_GAP = -0.5
"""Frequency-matched gap (nats) below which the demo reads the model as recalling from its context."""


def format_summary(doc: dict) -> str:
    def ppl(s):
        return "n/a" if s.get("ppl") is None else f"{s['ppl']:.2f}"

    lines = [
        f"AR slice{' at iteration ' + str(doc['iteration']) if doc.get('iteration') is not None else ''}"
        f" ({doc['all']['tokens']:,} tokens, threshold {doc['threshold']}):",
        f"  perplexity all {ppl(doc['all'])} | AR hits {ppl(doc['ar_hits'])} | other {ppl(doc['other'])}"
        f" | AR-hit fraction {100 * (doc['ar_hit_fraction'] or 0):.2f}%",
    ]
    if doc.get("bigrams_not_in_counts"):
        lines.append(f"  warning: {doc['bigrams_not_in_counts']:,} tokens' bigrams are not in the counts file, which "
                     f"was made for other evaluation data (counted as never seen in training); count again with "
                     f"python -m tokenization.bigrams --eval-prefix <this validation data>")
    gap = doc.get("gap")
    if gap:
        share = "n/a" if gap["share"] is None else f"{100 * gap['share']:.1f}%"
        lines.append(f"  vs reference: overall NLL gap {gap['overall_nll_gap']:+.4f}, AR-hit gap "
                     f"{gap['ar_hits_nll_gap']:+.4f}, share of the gap due to AR hits {share}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from eval.standalone import main as standalone_main

    return standalone_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
