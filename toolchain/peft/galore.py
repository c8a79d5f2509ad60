"""GaLore (Zhao et al., 2024) for conv nets: Adam whose moments live in a rank-r projection of each
weight's gradient. Weights stay full rank; only the optimizer changes.

Written here rather than taken from the ``galore-torch`` package: that package pulls transformers
and bitsandbytes, and projects 2-D matrices only, while conv kernels are 3-D or 4-D. A kernel of
shape (C_out, ...) is treated as the matrix (C_out, C_in/g * k1 [* k2]).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class GaLoreAdam(torch.optim.Optimizer):
    """Adam with gradient low-rank projection for tensors of 2+ dims; plain Adam for the rest.

    rank: projection rank r (clipped to min(m, n)). update_gap: steps between projector refreshes
    (SVD of the current gradient). scale: the GaLore alpha applied to projected updates.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        rank: int = 4,
        update_gap: int = 50,
        scale: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "rank": rank, "update_gap": update_gap, "scale": scale, "betas": betas, "eps": eps}
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        grad = p.grad
        assert grad is not None
        mat = grad.reshape(grad.shape[0], -1) if grad.dim() >= 2 else None
        r = group["rank"]
        if mat is None or r >= min(mat.shape):
            direction = self._adam(state, grad, group)
            p.add_(direction, alpha=-group["lr"])
            return
        left = mat.shape[0] <= mat.shape[1]
        if "proj" not in state or (state["step"] - 1) % group["update_gap"] == 0:
            u, _, vh = torch.linalg.svd(mat, full_matrices=False)
            state["proj"] = u[:, :r].contiguous() if left else vh[:r].T.contiguous()
        proj = state["proj"]
        low = proj.T @ mat if left else mat @ proj  # (r, n) or (m, r)
        direction = self._adam(state, low, group)
        full = proj @ direction if left else direction @ proj.T
        p.add_(full.reshape(p.shape), alpha=-group["lr"] * group["scale"])

    @staticmethod
    def _adam(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        b1, b2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state tensors."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))
