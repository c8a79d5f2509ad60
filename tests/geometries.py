"""The table of conv geometries every LoRA-Edge path is checked on (training and graph stages)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# id -> (dims, kwargs for nn.ConvNd, input length/side, rank)
GEOMETRIES: dict[str, tuple[int, dict[str, Any], int, int]] = {
    "1d-plain": (1, dict(in_channels=6, out_channels=8, kernel_size=3, padding=1), 32, 4),
    "1d-stride2-nobias": (
        1,
        dict(in_channels=6, out_channels=10, kernel_size=5, stride=2, padding=2, bias=False),
        33,
        3,
    ),
    "1d-dilation": (1, dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2), 30, 8),
    "1d-groups2": (1, dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=2), 24, 4),
    "1d-depthwise": (1, dict(in_channels=12, out_channels=12, kernel_size=3, padding=1, groups=12, bias=False), 24, 8),
    "1d-pointwise": (1, dict(in_channels=16, out_channels=24, kernel_size=1), 20, 4),
    "1d-reflect": (1, dict(in_channels=5, out_channels=7, kernel_size=5, padding=2, padding_mode="reflect"), 28, 2),
    "1d-same": (1, dict(in_channels=4, out_channels=6, kernel_size=4, padding="same"), 21, 3),
    "2d-plain": (2, dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), 12, 4),
    "2d-stride-dil": (
        2,
        dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), dilation=(1, 2), padding=(1, 3)),
        14,
        4,
    ),
    "2d-depthwise": (2, dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8), 10, 8),
    "2d-groups-nobias": (2, dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, bias=False), 11, 2),
    "2d-circular": (2, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="circular"), 9, 16),
}


def make_conv(geom_id: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, int]:
    """A randomly initialised conv from the table, an input batch for it, and its rank."""
    dims, kwargs, size, rank = GEOMETRIES[geom_id]
    torch.manual_seed(seed)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(**kwargs)
    shape = (2, kwargs["in_channels"]) + (size,) * dims
    return conv.eval(), torch.randn(*shape), rank
