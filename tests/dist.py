"""Forked multi-process tests: N ranks on gloo, forked from the warm pytest parent (~0.25 s).

`run_ranks(fn, world, *args)` forks `world` children; child r sets the torch.distributed env
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls `fn(r, *args)` and sends back its
return value (anything picklable). A failing rank's traceback is raised in the parent.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, conn, args, timeout):
    try:
        import faulthandler

        import torch

        faulthandler.dump_traceback_later(max(1.0, timeout - 5), exit=False)  # a hung rank shows where

        torch.set_num_threads(1)
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )
        # Plain pickle: multiprocessing's own pickler would share tensors through file descriptors
        # that die with this process.
        conn.send_bytes(pickle.dumps(("ok", fn(rank, *args))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()
        os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 240.0) -> list:
    ctx = mp.get_context("fork")
    port = free_port()
    procs, pipes = [], []
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(fn, rank, world, port, child, args, timeout))
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    results, errors = [], []
    for rank, (p, conn) in enumerate(zip(procs, pipes)):
        if conn.poll(timeout):
            try:
                status, value = pickle.loads(conn.recv_bytes())
            except EOFError:  # killed before reporting (e.g. SIGKILL)
                p.join(5)
                status, value = "error", f"rank {rank} died without a result (exit code {p.exitcode})"
        else:
            status, value = "error", f"rank {rank} timed out after {timeout} s"
        (results if status == "ok" else errors).append(value if status == "ok" else f"rank {rank}:\n{value}")
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results


def init_tp(tp: int, pp: int = 1):
    """In a forked rank: gloo process group + megatron-core model parallel + seeds."""
    from neox_zoology.parallel import setup
    from neox_zoology.parallel.cpu_compat import model_parallel_seed

    setup.init_distributed("gloo")
    setup.init_model_parallel(tp, pp)
    model_parallel_seed(1234)


def gather_tp_param(p):
    """Full tensor of a parameter split over TP (or the parameter itself when replicated)."""
    import torch
    from megatron.core import parallel_state

    from neox_zoology.parallel import tp_size

    if tp_size() == 1 or not getattr(p, "tensor_model_parallel", False):
        return p.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(p) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, p.detach().contiguous(), group=group)
    return torch.cat(parts, dim=p.partition_dim)


def gather_tp_grad(p):
    import torch
    from megatron.core import parallel_state

    from neox_zoology.parallel import tp_size

    g = p.grad.detach().contiguous()
    if tp_size() == 1 or not getattr(p, "tensor_model_parallel", False):
        return g.clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(g) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, g, group=group)
    return torch.cat(parts, dim=p.partition_dim)


def model_grads(rank, raw, tp: int, masked: bool = False):
    """In a forked rank: the whole model of `raw` at TP size `tp`, one forward+backward of the LM loss on a
    seeded batch (with a random loss mask when `masked`). Returns (loss, {name: full gradient}, the type
    name of what the model returned)."""
    import torch

    from neox_zoology.config import build_args
    from neox_zoology.model.gpt import SequentialGPT, lm_loss
    from neox_zoology.training.engine import model_config
    from neox_zoology.tokenizer import resolve_vocab

    init_tp(tp)
    args = build_args(raw, world_size=tp)
    resolve_vocab(args)
    model = SequentialGPT(args, model_config(args))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, args.seq_length), generator=g)
    labels = torch.randint(0, args.vocab_size, (2, args.seq_length), generator=g)
    mask = (torch.rand(2, args.seq_length, generator=g) > 0.25).float() if masked else torch.ones(labels.shape)
    out = model(tokens)
    loss = lm_loss(out, (labels, mask))
    loss.backward()
    return float(loss), {n: gather_tp_grad(p) for n, p in model.named_parameters()}, type(out).__name__


def assert_tp2_equals_tp1(raw, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """The model of `raw` gives the same LM loss and full gradients at TP 2 (both ranks) as at TP 1."""
    import pytest
    import torch

    (loss1, g1, _), = run_ranks(model_grads, 1, raw, 1)
    for loss2, g2, _ in run_ranks(model_grads, 2, raw, 2):
        assert loss2 == pytest.approx(loss1, abs=atol)
        assert g1.keys() == g2.keys()
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], atol=atol, rtol=rtol, msg=name)


PAPER_RUN_KEYS_OFF = ["train_data_paths=null", "valid_data_paths=null", "test_data_paths=null", "merge_file=null",
                      "ar_eval={enabled: false}", "save=null", "load=null", "tensorboard_dir=null"]
"""`--set`s that take a paper config's Pile data, GPT-2 files, AR slice and output folders away, so a test can
give it its own small data (each --set replaces one key)."""
