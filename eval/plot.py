"""Figure-1-style plot of an AR-slice result: log-perplexity (mean NLL) vs bigram training frequency,
AR hits (solid) vs other tokens (dashed); overlays (a previous step, a reference run) in other colours."""
from __future__ import annotations

from pathlib import Path


def _series(doc: dict, slice_name: str):
    xs, ys = [], []
    for b in doc.get("by_frequency", []):
        s = b[slice_name]
        if s["nll"] is None:
            continue
        lo, hi = b["min_count"], b["max_count"]
        xs.append(0.5 if lo == 0 else (lo if hi is None else (lo * hi) ** 0.5))  # never-seen bigrams at 0.5
        ys.append(s["nll"])
    return xs, ys


def plot_ar_slice(doc: dict, path, overlays=(), title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    runs = [("this run", doc), *overlays]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, d) in enumerate(runs):
        c = colors[i % len(colors)]
        for slice_name, style, name in (("ar_hits", "-", "AR hits"), ("other", "--", "other tokens")):
            xs, ys = _series(d, slice_name)
            if xs:
                ax.plot(xs, ys, style, marker="o", ms=3, color=c, label=f"{label}: {name}")
    thr = doc.get("threshold")
    if thr is not None:
        ax.axvline(max(thr, 0.5), color="grey", lw=0.8, ls=":", label=f"threshold {thr}")
    ax.set_xscale("log")
    ax.set_xlabel("bigram frequency in training (count; never seen at 0.5)")
    ax.set_ylabel("log-perplexity (mean NLL, nats)")
    ppl = doc["all"]["ppl"]
    ax.set_title(f"AR slice {title}: ppl all {ppl:.2f}" if ppl is not None else f"AR slice {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
