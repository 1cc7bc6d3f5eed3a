"""Multi-query associative recall (MQAR) examples, following Zoology §3.2 / Appendix E.

One example of length L holds `num_kv_pairs` key-value pairs at the start, `k1 v1 k2 v2 ...`
(keys drawn without replacement from [1, V/2), values from [V/2, V)), then a query region where
every key appears exactly once more, at an even offset `2 * gap` with the gaps drawn without
replacement from a power law p(i) ∝ a·i^(a-1), i = 1..(L - 2·kv)/2. The target at a query position
is the value that followed that key in the context; every other position carries the ignore index.

The sequence is built at length L + 1 and shifted (inputs = ex[:-1], labels = lab[1:]), so the label
sits on the input position that holds the queried key. Filler tokens between queries are 0, or
random non-key, non-value-of-this-example tokens with `filler="random"` (the reference's
`random_non_queries` can draw a key of the same example and thereby plant a second, wrong query).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


class MQARError(ValueError):
    """Invalid MQAR arguments (the message names the argument, its value and the fix)."""


@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    filler: str = "zero"  # "zero" | "random"

    def check(self) -> None:
        V, L, kv = self.vocab_size, self.seq_len, self.num_kv_pairs
        if L <= 0 or L % 2:
            raise MQARError(f"seq_len {L}: must be a positive even number (keys are queried at even offsets)")
        if kv <= 0:
            raise MQARError(f"num_kv_pairs {kv}: must be at least 1")
        if V <= L:
            raise MQARError(f"vocab_size {V} must be larger than seq_len {L}; raise --vocab-size above {L}")
        if 4 * kv > L:
            raise MQARError(
                f"num_kv_pairs {kv} is too many for seq_len {L}: the pairs and their queries need 4 x {kv} = "
                f"{4 * kv} positions; use at most {L // 4} pairs or seq_len >= {4 * kv}"
            )
        if kv > V // 2 - 1:
            raise MQARError(f"num_kv_pairs {kv} exceeds the {V // 2 - 1} distinct keys of vocab_size {V}")
        if not 0 < self.power_a <= 1:
            raise MQARError(f"power_a {self.power_a}: use a value in (0, 1] (the paper uses 0.01)")
        if self.filler not in ("zero", "random"):
            raise MQARError(f"filler {self.filler!r}: use 'zero' or 'random'")


def _distinct(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
    """n rows of k distinct ints from [low, high), each row a uniform draw without replacement."""
    width = high - low
    if k * k > width:  # dense (a repeat-free row of k would be rare): the k smallest of random keys
        out = np.empty((n, k), dtype=np.int64)
        chunk = max(1, (1 << 22) // width)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            out[s:s + m] = np.argpartition(rng.random((m, width)), k - 1, axis=1)[:, :k] + low
        return out
    out = rng.integers(low, high, size=(n, k))  # sparse: redraw the rows that repeat a value
    while True:
        srt = np.sort(out, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if not dup.any():
            return out
        out[dup] = rng.integers(low, high, size=(int(dup.sum()), k))


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    i = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * i ** (power_a - 1)
    return p / p.sum()


def generate(cfg: MQARConfig, num_examples: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """`inputs` [N, L] and `labels` [N, L] (int64; IGNORE_INDEX except at the queries).

    `seed` is an int or a sequence of ints (numpy SeedSequence entropy): train and test sets use
    different seeds, so their random streams are disjoint.
    """
    cfg.check()
    if num_examples <= 0:
        raise MQARError(f"num_examples {num_examples}: must be at least 1")
    rng = np.random.default_rng(seed)
    V, L, kv = cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs
    N = num_examples
    keys = _distinct(rng, N, kv, 1, V // 2)
    values = _distinct(rng, N, kv, V // 2, V)
    context = np.empty((N, 2 * kv), dtype=np.int64)
    context[:, 0::2], context[:, 1::2] = keys, values

    space = (L - 2 * kv) // 2
    logp = np.log(gap_probabilities(space, cfg.power_a))
    # kv distinct gaps per example, without replacement, ∝ p: Gumbel top-k.
    gumbel = logp[None, :] - np.log(-np.log(rng.random((N, space))))
    gaps = np.argpartition(-gumbel, kv - 1, axis=1)[:, :kv]  # 0-based: gap index i <-> power-law term i+1

    queries = np.zeros((N, L - 2 * kv + 1), dtype=np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    full = np.concatenate([context, queries], axis=1)  # [N, L + 1]
    lab = np.full((N, L + 1), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(lab, 2 * kv + 2 * gaps + 1, values, axis=1)
    inputs, labels = full[:, :-1].copy(), lab[:, 1:].copy()

    if cfg.filler == "random":
        region = np.zeros_like(inputs, dtype=bool)
        region[:, 2 * kv:] = True
        region &= inputs == 0
        fill = rng.integers(1, V, size=inputs.shape)
        bad = region & _row_isin(fill, context)
        while bad.any():
            fill[bad] = rng.integers(1, V, size=int(bad.sum()))
            bad = region & _row_isin(fill, context)
        inputs[region] = fill[region]
    return inputs, labels


def _row_isin(x: np.ndarray, row_sets: np.ndarray) -> np.ndarray:
    """x[i, j] in row_sets[i, :] for every (i, j)."""
    s = np.sort(row_sets, axis=1)
    idx = np.clip(np.stack([np.searchsorted(s[i], x[i]) for i in range(len(x))]), 0, s.shape[1] - 1)
    return np.take_along_axis(s, idx, axis=1) == x


def check_example(inputs: np.ndarray, labels: np.ndarray, num_kv_pairs: int) -> None:
    """Raise AssertionError unless (inputs, labels) satisfy the MQAR definition (used by the tests)."""
    kv = num_kv_pairs
    for row, (x, y) in enumerate(zip(inputs, labels)):
        ctx = x[: 2 * kv]
        keys, values = ctx[0::2], ctx[1::2]
        lookup = dict(zip(keys.tolist(), values.tolist()))
        assert len(lookup) == kv, f"row {row}: keys repeat in the context"
        pos = np.flatnonzero(y != IGNORE_INDEX)
        assert len(pos) == kv, f"row {row}: {len(pos)} labelled positions, expected {kv}"
        assert sorted(x[pos].tolist()) == sorted(keys.tolist()), f"row {row}: not every key is queried once"
        for t in pos:
            assert t >= 2 * kv and (t - 2 * kv) % 2 == 0, f"row {row}: query at {t} is not at an even offset"
            assert y[t] == lookup[int(x[t])], f"row {row}: label at {t} is not the value of key {x[t]}"
        rest = np.ones(len(x), dtype=bool)
        rest[: 2 * kv] = False
        rest[pos] = False
        assert not np.isin(x[rest], keys).any(), f"row {row}: a filler token equals a key"


def save_npz(path, inputs, labels, cfg: MQARConfig, seed: int) -> None:
    np.savez_compressed(path, inputs=inputs, labels=labels, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                        num_kv_pairs=cfg.num_kv_pairs, power_a=cfg.power_a, seed=seed, filler=cfg.filler)
