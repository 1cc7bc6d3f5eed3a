"""bench.reference: the peer it builds for RWKV is the reference kernel's math; it reports, and skips clearly."""
from __future__ import annotations

import json

import pytest
import torch

from bench import reference, summary


def wkv_recurrence(time_decay, time_first, k, v):
    """RWKV-4's WKV one position at a time (k, v [B, T, C]), float64, no rescaling."""
    w, u = -torch.exp(time_decay), time_first
    num = torch.zeros_like(k[:, 0])
    den = torch.zeros_like(num)
    out = []
    for t in range(k.shape[1]):
        now = torch.exp(u + k[:, t])
        out.append((num + now * v[:, t]) / (den + now))
        num = torch.exp(w) * num + torch.exp(k[:, t]) * v[:, t]
        den = torch.exp(w) * den + torch.exp(k[:, t])
    return torch.stack(out, 1)


def test_wkv_kernel_port_forward_and_backward_are_the_recurrence_s():
    torch.manual_seed(0)
    B, T, C = 2, 37, 5
    leaves = [torch.linspace(-3, 2, C), torch.linspace(-1, 1, C), torch.randn(B, T, C), torch.randn(B, T, C)]
    ours = [t.double().requires_grad_() for t in leaves]
    ref = [t.double().requires_grad_() for t in leaves]
    g = torch.randn(B, T, C, dtype=torch.float64)
    y = reference.WKVKernelPort.apply(B, T, C, *ours)
    y_ref = wkv_recurrence(*ref)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for name, a, b in zip(("time_decay", "time_first", "k", "v"), ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-8, msg=name)


def test_hyena_rows_map_stream_major_to_channel_major():
    assert reference._perm_streams(2).tolist() == [0, 2, 4, 1, 3, 5]  # ours c*3 + s <- reference s*d + c


def test_without_a_checkout_the_run_is_skipped_with_the_reason(tmp_path, capsys):
    out = tmp_path / "reference.json"
    r = reference.main(["--zoology", str(tmp_path / "nowhere"), "--out", str(out), "--md", str(tmp_path / "r.md")])
    assert "no zoology checkout" in r["skipped"] and json.loads(out.read_text())["skipped"] == r["skipped"]
    assert "Skipped: no zoology checkout" in (tmp_path / "r.md").read_text()
    assert summary._reference(r)[0][0].startswith("skipped: no zoology checkout")


def test_targets_markdown_and_summary_rows():
    result = {"benchmark": "reference", "reference": {"zoology_commit": "d88d6f5", "safari_commit": None},
              "config": {"parity_hidden": 64, "parity_len": 256, "batch": 4, "hidden": 256, "seq_len": 1024,
                         "threads": 1, "rounds": 5},
              "mixers": {
                  "hyena": {"parity": {"output_rel": 1e-16, "input_grad_rel": 2e-16, "param_grad_rel_max": 3e-16,
                                       "float32_limited": None},
                            "init": [{"hidden": 64, "ours_std": 1.0, "reference_std": 1.2, "ratio": 1 / 1.2}],
                            "speed": {"batch": 4, "hidden": 256, "seq_len": 1024, "ours_s": 0.8, "reference_s": 1.0,
                                      "ratio": 0.8}},
                  "rwkv": {"skipped": "reference not importable: ImportError: x"}}}
    t = reference.targets(result)
    assert [x["met"] for x in t] == [True, True, True]
    result["targets"] = t
    md = reference.markdown(result)
    assert "| hyena | 1.0e-16 | 2.0e-16 | 3.0e-16 | 64: 1 / 1.2 = 0.83 | 0.800 | 1.000 | 0.80 |" in md
    assert "| rwkv | skipped: reference not importable" in md
    rows = summary._reference(result)
    assert rows[0][2] == "<= 1e-06" and rows[1][2] == "within [0.667, 1.5]" and rows[2][3] is True


@pytest.mark.parametrize("variant", reference.VARIANTS)
def test_every_variant_builds_ours(variant):
    m = reference.build_ours(variant, 16, 32)
    assert m(torch.randn(2, 32, 16)).shape == (2, 32, 16)
