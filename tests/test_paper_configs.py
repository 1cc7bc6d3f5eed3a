"""The Zoology-paper scale configs (`configs/neox/{arch}_{scale}.yml`) land within 10% of the paper's counts,
the recall-efficient mixers' configs (Based, GLA, gated DeltaNet, Mamba, Mamba-2) within 5% of their papers'.

Counts come from the `--dry-run` summary (model built on the meta device, no weights). Cells without a
paper figure (BaseConv 70M; BaseConv, H3, RWKV, long conv at 1.4B) use the scale's attention figure.
`python tests/test_paper_configs.py` writes the table `bench/results/paper_configs.md`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from neox_zoology.config import load
from neox_zoology.training.dryrun import summarize

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "neox"
ARCHS = ("attention", "baseconv", "hyena", "h3", "rwkv", "long_conv")
SCALES = ("70m", "160m", "360m", "1.4b")

# Paper parameter counts in millions (Zoology paper tables; REFERENCE.md "Model scales").
# None: no paper figure -> the scale's attention figure is the target.
PAPER_M = {
    "70m": {"attention": 73, "baseconv": None, "hyena": 72, "h3": 72, "rwkv": 72, "long_conv": 76},
    "160m": {"attention": 125, "baseconv": 168, "hyena": 158, "h3": 168, "rwkv": 169, "long_conv": 128},
    "360m": {"attention": 360, "baseconv": 354, "hyena": 358, "h3": 357, "rwkv": 351, "long_conv": 360},
    "1.4b": {"attention": 1400, "baseconv": None, "hyena": 1400, "h3": None, "rwkv": None, "long_conv": None},
}
TOLERANCE = 0.10
CASES = [(a, s) for s in SCALES for a in ARCHS]

# The recall-efficient mixers that followed Zoology, against their own papers' sizes in millions (Based 360M /
# 1.3B, GLA 340M / 1.3B, gated DeltaNet 1.3B, Mamba 1.4B = state-spaces/mamba-1.4b's 1372M, Mamba-2 370M =
# state-spaces/mamba2-370m; 360M where a paper has no such size), within 5%.
RECALL_M = {
    ("based", "360m"): 360, ("gla", "360m"): 360, ("gated_deltanet", "360m"): 360, ("mamba", "360m"): 360,
    ("mamba2", "360m"): 370,
    ("based", "1.4b"): 1300, ("gla", "1.4b"): 1300, ("gated_deltanet", "1.4b"): 1300, ("mamba", "1.4b"): 1372,
}
RECALL_TOLERANCE = 0.05
# the layer types each recall config builds (Based is a hybrid, as in its paper)
RECALL_TYPES = {"based": {"based", "sliding_window", "baseconv"}}


def target_m(arch: str, scale: str) -> float:
    paper = PAPER_M[scale][arch]
    return PAPER_M[scale]["attention"] if paper is None else paper


def config_path(arch: str, scale: str) -> Path:
    return CONFIGS / f"{arch}_{scale}.yml"


def dry_run(arch: str, scale: str) -> dict:
    return summarize(load([config_path(arch, scale)], world_size=1))


@pytest.mark.parametrize("arch,scale", CASES, ids=[f"{a}_{s}" for a, s in CASES])
def test_parameters_match_paper(arch, scale):
    s = dry_run(arch, scale)
    got_m, want_m = s["parameters"] / 1e6, target_m(arch, scale)
    assert abs(got_m / want_m - 1) <= TOLERANCE, (
        f"{arch}_{scale}.yml: {got_m:.1f}M parameters, paper/target {want_m}M (ratio {got_m / want_m:.3f})")
    assert s["layer_types"] == [arch] * len(s["layer_types"])
    assert s["flops_per_token"] > 0


@pytest.mark.parametrize("arch,scale", sorted(RECALL_M), ids=[f"{a}_{s}" for a, s in sorted(RECALL_M)])
def test_recall_configs_match_published_sizes(arch, scale):
    s = dry_run(arch, scale)
    got_m, want_m = s["parameters"] / 1e6, RECALL_M[arch, scale]
    assert abs(got_m / want_m - 1) <= RECALL_TOLERANCE, (
        f"{arch}_{scale}.yml: {got_m:.1f}M parameters, published {want_m}M (ratio {got_m / want_m:.3f})")
    assert set(s["layer_types"]) == RECALL_TYPES.get(arch, {arch})
    assert s["flops_per_token"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_70m_builds_with_short_cpu_override(arch):
    args = load([config_path(arch, "70m")], sets=["seq_length=64", "bf16={enabled: false}"], world_size=1)
    assert args.seq_length == 64
    summarize(args)  # the model (and its seq-length-sized filters) builds at the short length


def markdown_table() -> str:
    rows = ["| config | parameters (M) | paper (M) | ratio | training GFLOP/token |",
            "|---|---:|---:|---:|---:|"]
    for arch, scale in CASES:
        s = dry_run(arch, scale)
        got_m, paper = s["parameters"] / 1e6, PAPER_M[scale][arch]
        want_m = target_m(arch, scale)
        paper_txt = f"{paper:g}" if paper is not None else f"— (target {want_m:g})"
        rows.append(f"| `{arch}_{scale}.yml` | {got_m:.1f} | {paper_txt} | {got_m / want_m:.3f} | "
                    f"{s['flops_per_token'] / 1e9:.3f} |")
    for arch, scale in sorted(RECALL_M, key=lambda c: (c[1], c[0])):
        s = dry_run(arch, scale)
        got_m, want_m = s["parameters"] / 1e6, RECALL_M[arch, scale]
        rows.append(f"| `{arch}_{scale}.yml` | {got_m:.1f} | {want_m:g} (its paper) | {got_m / want_m:.3f} | "
                    f"{s['flops_per_token'] / 1e9:.3f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    table = markdown_table()
    head = ("# Paper-scale configs: `--dry-run` parameters vs the Zoology paper\n\n"
            "Generated by `python tests/test_paper_configs.py` (meta-device build, GPT-2 vocabulary 50257 padded, "
            "tied LM head counted once, sequence 2048). Ratio is parameters / paper figure; cells without a "
            "paper figure use the scale's attention figure. Training FLOPs are fwd+bwd (3x forward) per token.\n\n")
    out = ROOT / "bench" / "results" / "paper_configs.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + table)
    print(table, end="")
    print(f"wrote {out.relative_to(ROOT)}")
