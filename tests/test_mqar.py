"""MQAR: the generator follows the definition, bad arguments are clear errors, the sweep harness
builds any registered pattern, caches finished cells and resumes, and writes JSON + plot."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from eval.mqar import configs
from eval.mqar.data import IGNORE_INDEX, MQARConfig, MQARError, check_example, gap_probabilities, generate


@pytest.mark.parametrize("V,L,kv,filler", [(8192, 64, 4, "zero"), (512, 256, 64, "zero"), (64, 32, 8, "random"),
                                            (300, 256, 16, "random")])
def test_examples_satisfy_the_definition(V, L, kv, filler):
    x, y = generate(MQARConfig(V, L, kv, filler=filler), 200, seed=3)
    assert x.shape == y.shape == (200, L)
    check_example(x, y, kv)  # every labelled position holds a key; its label is the value after that key
    keys, values = x[:, : 2 * kv : 2], x[:, 1 : 2 * kv : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert set(np.unique(y)) - {IGNORE_INDEX} <= set(range(V // 2, V))
    if filler == "zero":
        rest = y == IGNORE_INDEX
        rest[:, : 2 * kv] = False
        is_query = np.zeros_like(rest)
        np.put_along_axis(is_query, np.argwhere(y != IGNORE_INDEX)[:, 1].reshape(200, kv), True, axis=1)
        assert (x[rest & ~is_query] == 0).all()


def test_check_example_catches_a_wrong_label():
    x, y = generate(MQARConfig(128, 32, 4), 5, seed=0)
    t = np.flatnonzero(y[2] != IGNORE_INDEX)[0]
    y[2, t] = y[2, t] + 1 if y[2, t] + 1 < 128 else 64
    with pytest.raises(AssertionError, match="label at"):
        check_example(x, y, 4)


def test_gaps_follow_the_power_law_and_seeds_are_reproducible_and_distinct():
    cfg = MQARConfig(8192, 128, 4)
    x, y = generate(cfg, 4000, seed=1)
    pos = np.argwhere(y != IGNORE_INDEX)[:, 1]
    gap = (pos - 8) // 2  # 0-based gap index
    p = gap_probabilities((128 - 8) // 2, 0.01)
    assert p[0] > 10 * p[-1]
    hist = np.bincount(gap, minlength=len(p))
    assert hist[:5].sum() > hist[-5:].sum() * 3  # mass at short gaps, as p(i) ∝ a i^(a-1)
    again, _ = generate(cfg, 4000, seed=1)
    other, _ = generate(cfg, 4000, seed=2)
    assert np.array_equal(x, again) and not np.array_equal(x, other)
    assert not np.array_equal(generate(cfg, 50, seed=[0, 128, 5])[0], generate(cfg, 50, seed=[1_000_003, 128])[0])


@pytest.mark.parametrize("args,msg", [
    ((8192, 63, 4), r"seq_len 63: must be a positive even number"),
    ((64, 64, 4), r"vocab_size 64 must be larger than seq_len 64"),
    ((8192, 64, 17), r"num_kv_pairs 17 is too many for seq_len 64: .* use at most 16 pairs"),
    ((8192, 64, 0), r"num_kv_pairs 0: must be at least 1"),
])
def test_bad_arguments_are_clear_errors(args, msg):
    with pytest.raises(MQARError, match=msg):
        generate(MQARConfig(*args), 10, seed=0)


def test_generate_cli_writes_inputs_and_labels(tmp_path):
    out = tmp_path / "train.npz"
    cmd = [sys.executable, "-m", "eval.mqar", "generate", "--vocab-size", "8192", "--seq-len", "64", "--kv-pairs", "4",
           "--num-examples", "100", "--seed", "5", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    assert z["inputs"].shape == z["labels"].shape == (100, 64)
    check_example(z["inputs"], z["labels"], 4)
    bad = subprocess.run(cmd[:-2] + ["--seq-len", "65", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "seq_len 65: must be a positive even number" in bad.stderr


# ----------------------------------------------------------------------------- model and sweep


def test_patterns_name_one_registered_type_per_layer():
    from eval.mqar.model import parse_pattern

    assert parse_pattern("baseconv+attention", 2) == ["baseconv", "attention"]
    assert parse_pattern("hyena", 2) == ["hyena", "hyena"]
    with pytest.raises(ValueError, match=r"mixer pattern 'baseconv\+atention': unknown layer type 'atention'"):
        parse_pattern("baseconv+atention", 2)


def test_model_scores_only_the_labelled_positions():
    from eval.mqar.model import MQARModel

    x, y = generate(MQARConfig(64, 32, 4), 3, seed=0)
    model = MQARModel(["baseconv", "attention"], 64, 16, 32)
    logits, targets = model(torch.from_numpy(x), torch.from_numpy(y))
    assert logits.shape == (12, 64) and targets.tolist() == y[y != IGNORE_INDEX].tolist()


def test_smoke_sweep_writes_results_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    from eval.mqar import sweep as sw

    cfg = configs.get("smoke")
    cfg["mixers"] = ["attention", "baseconv", "not_a_mixer+attention"]
    out = tmp_path / "smoke.json"
    data = sw.sweep(cfg, out, plot=tmp_path / "smoke.png", verbose=False)
    saved = json.loads(out.read_text())
    assert set(saved["cells"]) == {"attention|L16|kv2|d16", "baseconv|L16|kv2|d16"}
    assert saved["skipped"] == ["not_a_mixer+attention|L16|kv2|d16"]
    for cell in saved["cells"].values():
        assert 0.0 <= cell["best_accuracy"] <= 1.0 and cell["runs"][0]["steps"] == 30
        assert cell["best_accuracy"] == max(r["accuracy"] for r in cell["runs"])
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert "| attention |" in sw.markdown_table(data)

    def no_training(*a, **k):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr(sw, "run_cell", no_training)
    again = sw.sweep(cfg, out, verbose=False)  # resume: every cell is cached
    assert again["cells"] == saved["cells"] and not again["errors"]
    changed = sw.sweep({**cfg, "steps": 31}, out, verbose=False)  # other settings: the cells are trained again
    assert sorted(changed["errors"]) == sorted(saved["cells"])
    assert all("a cached cell was trained again" in e for e in changed["errors"].values())
    assert sw.table(changed) == {}  # cells computed with other settings are not reported as current


def test_sweep_skips_widths_a_mixer_already_solved(tmp_path):
    from eval.mqar import sweep as sw

    cfg = {**configs.get("smoke"), "d_models": [16, 24], "mixers": ["attention", "baseconv"],
           "steps": {"16": 15}, "eval_every": 15, "skip_solved_widths": True}
    cfg["target_accuracy"] = 0.0  # every run reaches it: no larger width may run
    data = sw.sweep(cfg, tmp_path / "a.json", workers=2, verbose=False)
    assert set(data["cells"]) == {"attention|L16|kv2|d16", "baseconv|L16|kv2|d16"}
    assert data["solved_below"] == {"attention|L16|kv2|d24": 16, "baseconv|L16|kv2|d24": 16}
    assert "| ✓ |" in sw.markdown_table(data)
    cfg["target_accuracy"] = 1.01  # never reached: every width runs
    data = sw.sweep(cfg, tmp_path / "b.json", workers=2, verbose=False)
    assert len(data["cells"]) == 4 and not data["solved_below"] and not data["errors"]


def test_attention_learns_a_small_mqar_task():
    from eval.mqar.sweep import train_one

    cfg = {**configs.get("smoke"), "vocab_size": 32, "steps": 400, "batch_size": 64, "eval_every": 50,
           "test_examples": 64, "target_accuracy": 0.95}
    r = train_one(cfg, "attention", 16, 2, 32, 3e-3)
    assert r["accuracy"] >= 0.95, r["history"]


def test_runs_train_on_the_configured_device_and_say_which(tmp_path):
    from eval.mqar.sweep import run_device, train_one

    assert run_device({}) == torch.device("cpu")
    assert run_device({"device": "auto"}) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = {**configs.get("smoke"), "steps": 2, "eval_every": 2, "test_examples": 8, "device": "auto"}
    r = train_one(cfg, "baseconv", 16, 2, 16, 3e-3)
    assert r["device"] == str(run_device(cfg)) and r["steps"] == 2


def test_sweep_cli_smoke(tmp_path, capsys):
    from eval.mqar.__main__ import main

    out = tmp_path / "cli.json"
    assert main(["sweep", "--config", "smoke", "--mixers", "baseconv", "--out", str(out), "--quiet"]) == 0
    assert "| baseconv | 16 / 2 |" in capsys.readouterr().out and out.with_suffix(".png").exists()
    assert list(json.loads(out.read_text())["cells"]) == ["baseconv|L16|kv2|d16"]
    assert main(["sweep", "--config", "smoke", "--seq-len", "16,32", "--kv-pairs", "2", "--out", str(out)]) == 2
    assert "--kv-pairs has 1 entries for 2 lengths" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["paper", "cpu", "smoke"])
def test_named_sweep_configs_are_valid(name):
    from eval.mqar.model import parse_pattern
    from eval.mqar.sweep import by_length, cells, learning_rates

    cfg = configs.get(name)
    for L, kv in cfg["lengths"]:
        MQARConfig(by_length(cfg, "vocab_size", L), L, kv, cfg["power_a"]).check()
        assert by_length(cfg, "batch_size", L) > 0
    for pattern in cfg["mixers"]:
        assert len(parse_pattern(pattern, cfg["num_layers"])) == 2 and learning_rates(cfg, pattern)
    assert len(cells(cfg)) == len(cfg["mixers"]) * len(cfg["lengths"]) * len(cfg["d_models"])
    if name == "paper":  # Zoology's Figure 2 settings
        assert cfg["vocab_size"] == 8192 and cfg["train_examples"] == 100_000 and cfg["epochs"] == 64
        assert cfg["lengths"] == [[64, 4], [128, 8], [256, 16], [512, 64]] and cfg["d_models"] == [64, 128, 256, 512]
        assert cfg["lrs"] == pytest.approx(list(np.logspace(-4, -2, 4)))


def test_fixed_training_set_runs_epochs_and_evaluates_each_epoch():
    from eval.mqar.sweep import train_one

    cfg = {**configs.get("smoke"), "train_examples": 64, "epochs": 3, "eval_every": 0,
           "position_embeddings": ["attention"]}
    r = train_one(cfg, "attention", 16, 2, 16, 3e-3)
    assert [step for step, _ in r["history"]] == [4, 8, 12]  # 64 examples / batch 16 = 4 steps per epoch


def test_mixer_args_cli_and_state_plot(tmp_path, capsys):
    """`sweep --mixer-args` records the section per cell; `plot` puts each (mixer, width) at its state size."""
    from eval.mqar.__main__ import main
    from neox_zoology import registry

    plain, conv = tmp_path / "plain.json", tmp_path / "conv.json"
    assert main(["sweep", "--config", "smoke", "--mixers", "attention,gla", "--steps", "2", "--out", str(plain),
                 "--quiet"]) == 0
    assert main(["sweep", "--config", "smoke", "--mixers", "gla", "--steps", "2", "--out", str(conv), "--quiet",
                 "--mixer-args", '{"gla": {"conv_size": 4}}']) == 0
    cell = json.loads(conv.read_text())["cells"]["gla|L16|kv2|d16"]
    assert cell["settings"]["layer_args"]["gla"]["conv_size"] == 4
    assert main(["sweep", "--config", "smoke", "--out", str(conv), "--mixer-args", '{"gla": {"conv": 4}}']) == 2
    assert "gla: unknown argument(s) conv" in capsys.readouterr().err

    png = tmp_path / "state.png"
    assert main(["plot", "--results", str(plain), str(conv), "--seq-len", "16", "--out", str(png)]) == 0
    pts = {(p["mixer"], p["d_model"]): p for p in json.loads(png.with_suffix(".json").read_text())["points"]}
    assert set(pts) == {("attention", 16), ("gla", 16), ("gla (conv_size=4)", 16)} and png.stat().st_size > 1000
    kv_cache = 2 * (2 * 16 * 16 * registry.STATE_BYTES)  # two attention layers, keys and values of 16 positions
    assert pts["attention", 16]["state_bytes"] == kv_cache
    assert pts["gla (conv_size=4)", 16]["state_bytes"] > pts["gla", 16]["state_bytes"]
    assert main(["plot", "--results", str(plain), "--seq-len", "64", "--out", str(png)]) == 2
    assert main(["plot", "--results", str(tmp_path / "none.json"), "--out", str(png)]) == 2
