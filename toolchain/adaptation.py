"""One adaptation core. ``finetune``, the grid's runs (the shift benchmark, ``compare``), ``fleet`` (through
``finetune``) and the Python API go through these steps: seed once, grow the head for new classes,
inject the method, train (on the lean path where it applies), evaluate, extract the adapter.

The caller prepares the data (which subjects, which split); everything from the base model on is here,
so the same inputs give the same adapter bytes whichever command ran them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from toolchain.adapters.adapter_file import Adapter
from toolchain.adapters.methods import get_method
from toolchain.core.errors import ToolchainError
from toolchain.data.windows import WindowDataset
from toolchain.memory import account, batch_for_budget
from toolchain.peft.galore import GaLoreAdam
from toolchain.peft.inject import AdaptConfig, check_called, extract_adapter, inject, set_train_mode
from toolchain.peft.lean import lean_training
from toolchain.qat import quantized_inputs
from toolchain.train import TrainConfig, TrainResult, count_params, evaluate, resolve_device, seed_everything, train


@dataclass(frozen=True)
class HeadChange:
    """New classes: the classifier grows from ``old`` (a subset of ``new``; [] for a fresh head) to ``new``."""

    old: list[str]
    new: list[str]


@dataclass
class Outcome:
    """What one adaptation produced (the typed result every command reads its numbers from)."""

    model: nn.Module
    base_state: dict[str, torch.Tensor]  # the base model's tensors before the head grew (for extraction)
    config: AdaptConfig  # as applied: "head" added where new classes need a trained head
    train: TrainConfig  # as run: the batch size a memory budget chose
    layers: list[str]
    trainable_params: int
    total_params: int
    f1_before: float
    accuracy_before: float
    f1_after: float
    accuracy_after: float
    result: TrainResult
    lean: bool
    peak_train_memory_bytes: int | None = None
    adapt_windows: int = 0
    test_windows: int = 0
    history: list[list[float]] = field(default_factory=list)  # [step, macro-F1] from step 0

    @property
    def training_path(self) -> str:
        return "lean" if self.lean else "reference"

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params


def expand_head(model: nn.Module, old: list[str], new: list[str]) -> None:
    """A classifier for ``new`` classes from one for ``old`` (a subset): known rows are copied."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    head = nn.Linear(linear.in_features, len(new), bias=linear.bias is not None)
    with torch.no_grad():
        head.weight.mul_(0.1)
        for i, name in enumerate(old):
            head.weight[new.index(name)] = linear.weight[i]
            if head.bias is not None and linear.bias is not None:
                head.bias[new.index(name)] = linear.bias[i]
    name = next(n for n, m in model.named_modules() if m is linear)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, head)


def with_trained_head(config: AdaptConfig) -> AdaptConfig:
    """The config with the head trained too, where the method freezes it (new classes need a trained head)."""
    spec = get_method(config.method)
    if spec.base_frozen and "head" not in spec.implied_groups and "head" not in config.train:
        return dataclasses.replace(config, train=tuple(sorted({*config.train, "head"})))
    return config


def prepare(
    model: nn.Module, config: AdaptConfig, seed: int | None, head: HeadChange | None = None, train_head: bool = False
) -> tuple[AdaptConfig, list[str]]:
    """Seed once, grow the head, inject ``config``'s method in place. Returns the config applied and the
    wrapped layers. The seed fixes every draw from here on: a new head's rows, LoRA's A, the batches
    (None: the caller's generators as they are, as the Python API leaves them)."""
    if seed is not None:
        seed_everything(seed)
    if head is not None:
        expand_head(model, head.old, head.new)
    if head is not None or train_head:
        config = with_trained_head(config)
    return config, inject(model, config)


def make_optimizer(model: nn.Module, cfg: AdaptConfig, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (with ``weight_decay``, TrainConfig's); GaLore's projected Adam
    for ``galore``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ToolchainError("nothing to train: every parameter is frozen", seen=cfg.method)
    if get_method(cfg.method).optimizer == "galore":
        if weight_decay:
            raise ToolchainError(
                "galore's optimizer has no weight decay", seen=weight_decay, remedy="train galore with weight_decay 0"
            )
        return GaLoreAdam(params, lr=lr, rank=cfg.rank)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def adapt(
    base: nn.Module,
    adapt_set: WindowDataset,
    test_set: WindowDataset,
    config: AdaptConfig,
    train_cfg: TrainConfig,
    *,
    head: HeadChange | None = None,
    train_head: bool = False,
    lean: bool = True,
    memory_budget: int | None = None,
    account_memory: bool = False,
    eval_during: bool = False,
    copy_base: bool = False,
    quantized: Mapping[str, float] | None = None,
) -> Outcome:
    """The whole adaptation of ``base`` (in place, or of a copy with ``copy_base``): prepare, train
    ``train_cfg`` on ``adapt_set`` (macro-F1 on ``test_set`` every ``train_cfg.eval_every`` steps with
    ``eval_during``), evaluate before and after. ``memory_budget`` (bytes) picks the largest batch whose
    accounted memory fits; ``account_memory`` records the accounted peak at the batch run. ``quantized``
    (module path -> scale, ``qat.read_int8_base``) fake-quantizes those modules' inputs in training only."""
    dev = resolve_device(train_cfg.device)
    model = copy.deepcopy(base) if copy_base else base
    model.to(dev)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config, layers = prepare(model, config, train_cfg.seed, head, train_head)
    trainable, total = count_params(model)
    f1_before, acc_before = evaluate(model, test_set, dev)
    check_called(model)  # a conv its parent never calls is refused now, before any training
    lean = lean and get_method(config.method).base_frozen
    set_mode: Callable[[nn.Module], None] = lambda m: set_train_mode(m, config.update_bn_stats)  # noqa: E731
    optimizer = lambda m: make_optimizer(m, config, train_cfg.lr, train_cfg.weight_decay)  # noqa: E731
    peak: int | None = None
    if memory_budget is not None or account_memory:
        acc = account(model, optimizer, adapt_set, set_mode, lean)
        if memory_budget is not None:
            train_cfg = dataclasses.replace(train_cfg, batch_size=batch_for_budget(acc, memory_budget, len(adapt_set)))
        peak = int(acc.at(train_cfg.batch_size))
    with lean_training(model, lean), quantized_inputs(model, quantized):
        result = train(
            model,
            adapt_set,
            train_cfg,
            set_mode=set_mode,
            optimizer=optimizer(model),
            eval_data=test_set if eval_during else None,
        )
    f1_after, acc_after = evaluate(model, test_set, dev)
    return Outcome(
        model=model,
        base_state=base_state,
        config=config,
        train=train_cfg,
        layers=layers,
        trainable_params=trainable,
        total_params=total,
        f1_before=f1_before,
        accuracy_before=acc_before,
        f1_after=f1_after,
        accuracy_after=acc_after,
        result=result,
        lean=lean,
        peak_train_memory_bytes=peak,
        adapt_windows=len(adapt_set),
        test_windows=len(test_set),
        history=[[0, f1_before], *[list(h) for h in result.history]],
    )


def extract(outcome: Outcome, info: dict[str, object]) -> Adapter:
    """The adapter: every tensor of the adapted model that differs from the base."""
    state = {k: v.cpu() for k, v in outcome.base_state.items()}
    return extract_adapter(outcome.model.cpu(), state, outcome.config, info)


__all__ = [
    "HeadChange",
    "Outcome",
    "adapt",
    "expand_head",
    "extract",
    "make_optimizer",
    "prepare",
    "with_trained_head",
]
