"""bench.decode at a tiny size: rows at the same parameter count, attention's state grows with the context
while the short-filter BaseConv's and gated DeltaNet's stay flat, ratios against attention, the plot."""
import json

import pytest
import torch

from bench import decode as bench


def test_tiny_run_reports_flat_and_growing_states_and_ratios(tmp_path, capfd):
    out, md, png = tmp_path / "decode.json", tmp_path / "decode.md", tmp_path / "decode.png"
    result = bench.main(["--contexts", "64", "256", "--hidden", "32", "--layers", "2", "--steps", "1", "--warmup", "0",
                         "--out", str(out), "--md", str(md), "--png", str(png)])
    params = result["params"]
    assert max(params.values()) / min(params.values()) < 1.05  # the same parameter count, within 5 %
    rows = {(r["row"], r["context"]): r for r in result["results"]}
    assert sorted(rows) == sorted((row, L) for row in bench.ROWS for L in (64, 256))
    assert rows[("attention", 256)]["state_bytes"] == 4 * rows[("attention", 64)]["state_bytes"]
    for row in ("baseconv", "gated_deltanet"):
        assert rows[(row, 256)]["state_bytes"] == rows[(row, 64)]["state_bytes"]
    assert rows[("baseconv_long", 256)]["state_bytes"] > rows[("baseconv_long", 64)]["state_bytes"]
    for (row, L), r in rows.items():
        assert r["tokens_per_s"] > 0
        assert r["ratio_tokens_per_s"] == pytest.approx(r["tokens_per_s"] / rows[("attention", L)]["tokens_per_s"])
    assert png.stat().st_size > 1000 and "| attention | 64 |" in md.read_text()
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_grow_extends_the_dimension_that_grows_with_the_prompt():
    g = torch.Generator().manual_seed(0)
    small = {"k": torch.ones(1, 2, 16, 4), "S": torch.ones(3), "pos": 16}
    large = {"k": torch.ones(1, 2, 32, 4), "S": torch.ones(3), "pos": 32}
    grown = bench.grow(small, large, 16, 32, 100, g)
    assert grown["k"].shape == (1, 2, 100, 4) and grown["S"].shape == (3,) and grown["pos"] == 100
    with pytest.raises(ValueError, match="not one dimension per position"):
        bench.grow({"k": torch.ones(2, 2)}, {"k": torch.ones(3, 3)}, 16, 32, 100, g)
