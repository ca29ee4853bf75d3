"""Optimizer state as safetensors + JSON (no pickle): tensors by ``<param id>.<name>``, everything else as JSON.

Why not ``torch.save``: a checkpoint is read back on resume, possibly from an object store other people can write
to; safetensors and JSON cannot run code when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIM_TENSORS, OPTIM_JSON = "optim.safetensors", "optim.json"


def save_optimizer(opt: torch.optim.Optimizer, directory: Path) -> None:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    save_file(tensors, str(directory / OPTIM_TENSORS))
    (directory / OPTIM_JSON).write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def read_optimizer_state(directory: Path) -> dict:
    """The optimizer state saved by :func:`save_optimizer`, in memory (ready for ``load_state_dict``)."""
    meta = json.loads((directory / OPTIM_JSON).read_text())
    tensors = load_file(str(directory / OPTIM_TENSORS))
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
