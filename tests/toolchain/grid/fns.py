"""Task functions for the runner's tests (importable by name, as the runner requires)."""

from typing import Any

CALLS: list[int] = []


def square(inputs: dict[str, Any]) -> dict[str, Any]:
    CALLS.append(inputs["x"])
    if inputs.get("stop"):  # an interruption (Ctrl-C) while this run is under way
        raise KeyboardInterrupt
    if inputs["x"] < 0:
        raise ValueError(f"negative input {inputs['x']}")
    return {"x": inputs["x"], "y": inputs["x"] ** 2}


def threads(inputs: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {"threads": torch.get_num_threads()}
