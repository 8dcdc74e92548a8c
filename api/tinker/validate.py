"""Every check a Tinker call's content gets before it is queued: a call the worker would refuse is a 400
naming the field now, never a failed future minutes later."""

from __future__ import annotations

import math
import re
from typing import Any, Literal, cast

from api.tinker.errors import bad_request
from api.tinker.wire import WireForward
from shared.settings import Settings
from shared.tinker_ops import LOSS_CONFIG_KEYS, LOSS_INPUTS, LOSS_NAMES, ForwardOp, LossName, OptimStepOp, TinkerDatum

NOT_SUPPORTED_LOSSES = ("gspo", "stable_reinforce", "custom")
MAX_SAMPLES = 16
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def check_tokens(call: str, where: str, tokens: list[int], vocab: int | None) -> None:
    for i, token in enumerate(tokens):
        if token < 0 or (vocab is not None and token >= vocab):
            bound = f"[0, {vocab})" if vocab is not None else "non-negative"
            raise bad_request(call, f"{where}[{i}]", f"token id {token} is outside the model's vocabulary {bound}")


def _finite(call: str, where: str, values: list[float]) -> None:
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise bad_request(call, f"{where}[{i}]", f"{value} is not a finite number")


def forward_op(call: str, wire: WireForward, vocab: int | None, settings: Settings) -> ForwardOp:
    """A forward / forward_backward request as the worker's ForwardOp; a 400 naming what is wrong otherwise."""
    if wire.loss_fn in NOT_SUPPORTED_LOSSES:
        raise bad_request(call, "loss_fn", f"{wire.loss_fn!r} is not supported by this server")
    if wire.loss_fn not in LOSS_NAMES:
        raise bad_request(call, "loss_fn", f"unknown loss {wire.loss_fn!r}; supported: {', '.join(LOSS_NAMES)}")
    loss = cast(LossName, wire.loss_fn)
    allowed = LOSS_CONFIG_KEYS[loss]
    config: dict[str, float] = {}
    for key, value in wire.loss_fn_config.items():
        if key not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise bad_request(call, f"loss_fn_config[{key!r}]", f"not a setting of {loss} (it takes: {known})")
        if isinstance(value, str) or not math.isfinite(value):
            raise bad_request(call, f"loss_fn_config[{key!r}]", f"{value!r} is not a finite number")
        config[key] = value
    if loss == "dro" and "beta" not in config:
        raise bad_request(call, "loss_fn_config['beta']", "dro needs beta")
    if not wire.data:
        raise bad_request(call, "data", "no data: send at least one datum")
    needed = LOSS_INPUTS[loss]
    readable = {"target_tokens", *needed}
    total = 0
    data: list[TinkerDatum] = []
    for i, datum in enumerate(wire.data):
        at = f"data[{i}]"
        if datum.unsupported_chunks:
            raise bad_request(call, datum.unsupported_chunks[0].split(" ")[0],
                              f"{', '.join(datum.unsupported_chunks)}: only encoded_text chunks are supported")  # fmt: skip
        if not datum.tokens:
            raise bad_request(call, f"{at}.model_input", "empty: a datum needs at least one token")
        total += len(datum.tokens)
        if total > settings.tinker_max_call_tokens:
            raise bad_request(call, "data", f"more than {settings.tinker_max_call_tokens} input tokens in one call "
                              "(LORA_TINKER_MAX_CALL_TOKENS): split it into several calls")  # fmt: skip
        check_tokens(call, f"{at}.model_input", datum.tokens, vocab)
        for name in datum.inputs:
            if name not in readable:
                reads = ", ".join(sorted(readable))
                raise bad_request(
                    call, f"{at}.loss_fn_inputs[{name!r}]", f"{loss} does not read it (it reads: {reads})"
                )
        for name in ("target_tokens", *needed):
            if name not in datum.inputs and not (loss == "cross_entropy" and name == "weights"):
                raise bad_request(call, f"{at}.loss_fn_inputs[{name!r}]", f"missing: {loss} needs it")
        for name, values in datum.inputs.items():
            if len(values) != len(datum.tokens):
                raise bad_request(call, f"{at}.loss_fn_inputs[{name!r}]",
                                  f"length {len(values)} != model_input length {len(datum.tokens)}")  # fmt: skip
        if datum.dtypes["target_tokens"] != "int64":
            raise bad_request(call, f"{at}.loss_fn_inputs['target_tokens']", "must be integer token ids (int64)")
        targets = [int(t) for t in datum.inputs["target_tokens"]]
        check_tokens(call, f"{at}.loss_fn_inputs['target_tokens']", targets, vocab)
        floats: dict[str, list[float]] = {}
        for name in needed:
            if name in datum.inputs:
                floats[name] = [float(v) for v in datum.inputs[name]]
                _finite(call, f"{at}.loss_fn_inputs[{name!r}]", floats[name])
        if loss == "cross_entropy" and "weights" not in floats:  # the SDK's default: every target counts
            floats["weights"] = [1.0] * len(datum.tokens)
        data.append(TinkerDatum(tokens=datum.tokens, target_tokens=targets, **floats))
    op: Literal["forward", "forward_backward"] = "forward" if wire.forward_only else "forward_backward"
    return ForwardOp(op=op, loss_fn=loss, loss_fn_config=config or None, data=data)


_ADAM_KEYS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")


def optim_op(call: str, adam: dict[str, Any] | None, other: dict[str, Any] | None) -> OptimStepOp:
    field, params = ("adam_params", adam) if adam is not None else ("optimizer_params", other)
    if params is None:
        raise bad_request(call, "adam_params", "missing: the optimizer's parameters")
    kind = params.get("type", "adamw" if field == "adam_params" else None)
    if kind == "dimuon":
        raise bad_request(call, f"{field}.type", "the dimuon optimizer is not supported by this server (adamw is)")
    if kind not in ("adamw", "adam"):
        raise bad_request(call, f"{field}.type", f"unknown optimizer {kind!r} (this server runs adamw)")
    values: dict[str, float] = {}
    for key, value in params.items():
        if key == "type":
            continue
        if key not in _ADAM_KEYS:
            raise bad_request(call, f"{field}.{key}", f"not an AdamW parameter ({', '.join(_ADAM_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad_request(call, f"{field}.{key}", f"{value!r} is not a finite number")
        values[key] = float(value)
    if "learning_rate" not in values:
        raise bad_request(call, f"{field}.learning_rate", "missing")
    checks = {
        "learning_rate": values["learning_rate"] >= 0,
        "beta1": 0 <= values.get("beta1", 0.9) < 1,
        "beta2": 0 <= values.get("beta2", 0.95) < 1,
        "eps": values.get("eps", 1e-12) >= 0,
        "weight_decay": values.get("weight_decay", 0.0) >= 0,
        "grad_clip_norm": values.get("grad_clip_norm", 0.0) >= 0,
    }
    for key, ok in checks.items():
        if not ok:
            raise bad_request(call, f"{field}.{key}", f"{values[key]} is out of range")
    return OptimStepOp.model_validate(values)


def checkpoint_name(call: str, name: str | None) -> str:
    """A checkpoint's name: one safe path component (it becomes a folder)."""
    if not name:
        raise bad_request(call, "path", "missing: the checkpoint's name")
    if not _NAME.match(name) or name in (".", ".."):
        raise bad_request(call, "path", f"{name[:80]!r} is not a usable checkpoint name: letters, digits, '.', '_' "
                          "and '-', at most 128, not starting with '.' or '-' (no '/': it is one name, not a path)")  # fmt: skip
    return name
