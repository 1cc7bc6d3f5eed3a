"""Property checks shared by the mixer tests."""
import torch


def assert_causal(module, x: torch.Tensor, t: int, close) -> None:
    """Perturbing inputs after position t leaves outputs up to t unchanged and changes later ones.

    `x` is [batch, seq, hidden]; `close(actual, expected)` is the tolerance check to use.
    """
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    y, y2 = module(x), module(x2)
    close(y2[:, : t + 1], y[:, : t + 1])
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])  # the perturbation is visible later
