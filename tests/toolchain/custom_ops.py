"""Two custom ops with no dynamo translation, for the export check: `twice_right`, whose TorchScript
translation matches its kernel (x * 2), and `twice_wrong`, whose translation computes x * 3."""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("tctest::twice_right", mutates_args=())
def twice_right(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@torch.library.custom_op("tctest::twice_wrong", mutates_args=())
def twice_wrong(x: torch.Tensor) -> torch.Tensor:
    return x * 2


for _op in (twice_right, twice_wrong):
    _op.register_fake(lambda x: torch.empty_like(x))


def _times(k: float):
    def symbolic(g, x):
        return g.op("Mul", x, g.op("Constant", value_t=torch.tensor(k)))

    return symbolic


torch.onnx.register_custom_op_symbolic("tctest::twice_right", _times(2.0), 18)
torch.onnx.register_custom_op_symbolic("tctest::twice_wrong", _times(3.0), 18)


class Net(nn.Module):
    """A conv, one of the ops, a mean over time, a linear head: (N, 2, T) -> (N, 3)."""

    def __init__(self, op: str = "twice_wrong", in_channels: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv1d(in_channels, 4, 3)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(torch.ops.tctest, self.op)(self.conv(x)).mean(-1))


def wrong(in_channels: int = 2, num_classes: int = 3) -> Net:
    return Net("twice_wrong", in_channels, num_classes)
