"""A loaded base model's clean state, and putting it back after a job trained an adapter on it.

`get_peft_model` changes the base in place: LoRA layers replace its linear modules, `modules_to_save`
wrappers replace whole modules (the embedding, the LM head), base parameters are frozen, and a job adds
hooks (the embedding's output cast) and compiles decoder layers (`nn.Module.compile`). peft's own
`unload()` is not a restore: for a `modules_to_save` wrapper it returns the *trained copy*, so the next
job would start from the last job's embedding. Instead, the module tree recorded at load time is put
back as it was, object for object, and then checked (`problems`) before the base is trained again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Attributes a job sets on base modules that are not part of the module tree (see forward_backward).
_JOB_ATTRIBUTES = ("_lora_server_cast", "peft_config", "_hf_peft_config_loaded")
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


@dataclass
class _ModuleState:
    module: nn.Module
    children: OrderedDict[str, nn.Module | None]
    parameters: dict[str, nn.Parameter | None]
    buffers: dict[str, torch.Tensor | None]
    hooks: dict[str, dict[Any, Any]]
    training: bool


@dataclass
class BaseSnapshot:
    """The base as loaded: every module with its children, parameters, buffers and hooks (the same
    objects, not copies: holding them costs no memory), which parameters required grad, the config, and
    a checksum of the weights' values."""

    modules: list[_ModuleState]
    requires_grad: dict[str, bool]
    config: dict[str, Any]
    checksum: torch.Tensor  # one float64 per parameter, on the CPU
    device_bytes: int  # parameters and buffers on an accelerator (0 on the CPU)

    @classmethod
    def take(cls, model: nn.Module) -> BaseSnapshot:
        modules = [
            _ModuleState(
                module,
                OrderedDict(module._modules),
                dict(module._parameters),
                dict(module._buffers),
                {name: dict(getattr(module, name)) for name in _HOOK_DICTS if hasattr(module, name)},
                module.training,
            )
            for module in model.modules()
        ]
        tensors = [*model.parameters(), *model.buffers()]
        device_bytes = sum(t.numel() * t.element_size() for t in tensors if t.device.type != "cpu")
        return cls(
            modules,
            {name: p.requires_grad for name, p in model.named_parameters()},
            _config_dict(model),
            checksum(model),
            device_bytes,
        )


def checksum(model: nn.Module) -> torch.Tensor:
    """A cheap fingerprint of every parameter's values: its sum and its sum of squares, in float64.

    One read of the weights (milliseconds on a GPU) and no copy of them. It is not a proof of equality,
    but an adapter merged into the base, or a step that updated a frozen weight, changes it.
    """
    with torch.no_grad():
        sums = [
            torch.stack([p.sum(dtype=torch.float64), p.square().sum(dtype=torch.float64)])
            if p.is_floating_point()
            else p.sum(dtype=torch.float64).expand(2)
            for p in model.parameters()
        ]
        return torch.stack(sums).cpu() if sums else torch.zeros(0, 2, dtype=torch.float64)


def restore(model: nn.Module, snapshot: BaseSnapshot) -> None:
    """Put the recorded module tree back: children, parameters, buffers, hooks, train/eval mode and
    `requires_grad`; drop compiled forwards and the attributes a job adds. The adapter's own modules
    are then unreachable from the base (and freed once the job's last reference to them goes)."""
    for state in snapshot.modules:
        module = state.module
        module._modules = OrderedDict(state.children)
        module._parameters = dict(state.parameters)
        module._buffers = dict(state.buffers)
        for name, hooks in state.hooks.items():
            current = getattr(module, name)
            current.clear()
            current.update(hooks)
        module.training = state.training
        # nn.Module.compile() stores its compiled forward here; the next job compiles (or not) for itself.
        module._compiled_call_impl = None
        for attribute in _JOB_ATTRIBUTES:
            module.__dict__.pop(attribute, None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.grad = None
            param.requires_grad_(snapshot.requires_grad.get(name, param.requires_grad))


def problems(model: nn.Module, snapshot: BaseSnapshot) -> list[str]:
    """What differs between `model` and the base it was when loaded (empty when it can be trained again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    found: list[str] = []
    leftovers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper)]
    if leftovers:
        found.append(f"adapter modules left in the base: {', '.join(leftovers[:3])}")
    if hasattr(model, "peft_config"):
        found.append("the base still carries a peft_config")
    params = dict(model.named_parameters())
    if set(params) != set(snapshot.requires_grad):
        changed = sorted(set(params) ^ set(snapshot.requires_grad))
        found.append(f"parameters differ from the loaded base's: {', '.join(changed[:3])}")
    grads = [n for n, p in params.items() if p.requires_grad != snapshot.requires_grad.get(n) or p.grad is not None]
    if grads:
        found.append(f"parameters with a changed requires_grad or a gradient: {', '.join(grads[:3])}")
    hooked = [type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    if hooked:
        found.append(f"compiled modules left: {', '.join(hooked[:3])}")
    if _config_dict(model) != snapshot.config:
        found.append("the model's config changed")
    if not found and not torch.equal(checksum(model), snapshot.checksum):
        found.append("the base weights' values changed")
    return found


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None else {}
