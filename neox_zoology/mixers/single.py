"""The single-process door's wrapper: [batch, seq, hidden] in and out, no bias tuple."""
from __future__ import annotations

from torch import nn


class SingleProcessMixer(nn.Module):
    def __init__(self, mixer: nn.Module, batch_first: bool = True):
        super().__init__()
        self.mixer = mixer
        self.batch_first = batch_first

    def forward(self, x, token_ids=None):
        h = x.transpose(0, 1) if self.batch_first else x
        y, bias = self.mixer(h, token_ids=token_ids)
        if bias is not None:
            y = y + bias
        return y.transpose(0, 1) if self.batch_first else y
