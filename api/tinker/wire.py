"""The Tinker SDK's protobuf wire format, to and from the service's own shapes (shared.tinker_ops).

Only `forward_backward` requests, their results and sampling results travel as protobuf; every other call is
JSON. Arrays are raw little-endian bytes (int32 tokens, int64/int32/float32 tensors, int64 byte offsets).
The stdlib's `array` reads and writes them: the API needs no numpy.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from api.tinker import tinker_public_pb2 as pb
from shared.tinker_ops import ForwardResult, SampleResult

PROTOBUF = "application/x-protobuf"
_LITTLE = sys.byteorder == "little"
# What the SDK sends in each dtype, as `array` type codes (int64 'q', int32 'i', float32 'f').
_CODES = {pb.DTYPE_INT64: "q", pb.DTYPE_INT32: "i", pb.DTYPE_FLOAT32: "f"}
_DTYPE_NAMES = {pb.DTYPE_UNSPECIFIED: "unspecified", pb.DTYPE_BFLOAT16: "bfloat16"}


class WireError(ValueError):
    """A request body that is not what the SDK sends; the message names the part (`data[2].loss_fn_inputs...`)."""


def _unpack(code: str, raw: bytes, where: str) -> list[float] | list[int]:
    values = array(code)
    if len(raw) % values.itemsize:
        raise WireError(f"{where}: {len(raw)} bytes is not a whole number of {values.itemsize}-byte values")
    values.frombytes(raw)
    if not _LITTLE:
        values.byteswap()
    return values.tolist()


def _pack(code: str, values: Sequence[float] | Sequence[int]) -> bytes:
    packed = array(code, values)
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


@dataclass
class WireDatum:
    """One datum as sent: its input tokens, each loss input flattened (dense), and the chunk kinds it held."""

    tokens: list[int]
    inputs: dict[str, list[float] | list[int]]
    dtypes: dict[str, str]
    unsupported_chunks: list[str] = field(default_factory=list)


@dataclass
class WireForward:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    data: list[WireDatum]


def _tensor(tensor: pb.Tensor, where: str) -> tuple[list[float] | list[int], str]:
    code = _CODES.get(tensor.dtype)
    if code is None:
        name = _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        raise WireError(f"{where}: dtype {name} is not supported (int64, int32 or float32)")
    dtype = "float32" if code == "f" else "int64"
    shape = list(tensor.shape)
    if tensor.WhichOneof("encoding") == "sparse_csr":
        return _dense_of_csr(tensor.sparse_csr, code, shape, where), dtype
    values = _unpack(code, tensor.dense, where)
    if shape and math.prod(shape) != len(values):
        raise WireError(f"{where}: shape {shape} does not hold {len(values)} values")
    if len(shape) > 1:
        raise WireError(f"{where}: shape {shape}: each loss input is one value per token (a 1-D array)")
    return values, dtype


def _dense_of_csr(csr: pb.SparseCsr, code: str, shape: list[int], where: str) -> list[float] | list[int]:
    if len(shape) != 2:
        raise WireError(f"{where}: a sparse_csr tensor needs a 2-D shape, got {shape}")
    rows, cols = shape
    if rows != 1:  # per-datum inputs are 1-D: a CSR form of one is a single row
        raise WireError(f"{where}: shape {shape}: each loss input is one value per token (a 1-D array)")
    values = _unpack(code, csr.values, where + ".values")
    crow = _unpack("q", csr.crow_indices, where + ".crow_indices")
    col = _unpack("q", csr.col_indices, where + ".col_indices")
    if len(crow) != rows + 1 or len(col) != len(values) or (crow and (crow[0] != 0 or crow[-1] != len(values))):
        raise WireError(f"{where}: inconsistent sparse_csr indices")
    dense: list[Any] = [0.0 if code == "f" else 0] * cols
    for index, value in zip(col, values, strict=True):
        if not 0 <= int(index) < cols:
            raise WireError(f"{where}: sparse_csr column {index} outside [0, {cols})")
        dense[int(index)] = value
    return dense


def decode_forward_backward(body: bytes) -> WireForward:
    """A ForwardBackwardRequest's contents; WireError for a body that is not one, or holds what cannot be read."""
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise WireError(f"the body is not a tinker_public.ForwardBackwardRequest protobuf: {exc}") from exc
    config: dict[str, float | str] = {}
    if request.loss_fn_config_v2:  # the SDK writes both; v2 also carries strings
        for key, value in request.loss_fn_config_v2.items():
            config[key] = value.number if value.WhichOneof("value") == "number" else value.text
    else:
        config = {key: float(value) for key, value in request.loss_fn_config.items()}
    data: list[WireDatum] = []
    for i, datum in enumerate(request.data):
        tokens: list[int] = []
        unsupported: list[str] = []
        for j, chunk in enumerate(datum.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind == "encoded_text":
                tokens.extend(int(t) for t in _unpack("i", chunk.encoded_text.tokens, f"data[{i}].model_input[{j}]"))
            else:
                unsupported.append(f"data[{i}].model_input[{j}] ({kind or 'empty'} chunk)")
        inputs: dict[str, list[float] | list[int]] = {}
        dtypes: dict[str, str] = {}
        for name, tensor in datum.loss_fn_inputs.items():
            inputs[name], dtypes[name] = _tensor(tensor, f"data[{i}].loss_fn_inputs[{name!r}]")
        data.append(WireDatum(tokens=tokens, inputs=inputs, dtypes=dtypes, unsupported_chunks=unsupported))
    return WireForward(
        model_id=request.model_id,
        seq_id=request.seq_id,
        loss_fn=request.loss_fn,
        loss_fn_config=config,
        forward_only=request.forward_only,
        data=data,
    )


def _batched(per_datum: list[list[float]]) -> pb.BatchedTensor:
    offsets = [0]
    for values in per_datum:
        offsets.append(offsets[-1] + 4 * len(values))
    data = b"".join(_pack("f", values) for values in per_datum)
    return pb.BatchedTensor(data=data, offsets=_pack("q", offsets), dtype=pb.DTYPE_FLOAT32)


def metric_name(key: str) -> str:
    """A metric key the SDK can reduce: `<name>:<reduction>` with exactly one colon (`loss` -> `loss:sum`)."""
    if key.count(":") == 1:
        return key
    return key.replace(":", "_") + ":sum"


def encode_forward_result(result: ForwardResult) -> bytes:
    """A ForwardBackwardOutput: one ArrayRecord holding each datum's `logprobs` and `elementwise_loss`."""
    output = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result.metrics.items():
        output.metrics[metric_name(key)] = float(value)
    record = output.loss_fn_outputs.add()
    record.num_datums = len(result.loss_fn_outputs)
    for name in ("logprobs", "elementwise_loss"):
        per_datum = [list(outputs.get(name, [])) for outputs in result.loss_fn_outputs]
        record.fields[name].CopyFrom(_batched(per_datum))
    return output.SerializeToString()


def encode_sample_result(result: SampleResult) -> bytes:
    """A SampleResponse; prompt log-probabilities (when asked for) have NaN where there is none (position 0)."""
    response = pb.SampleResponse()
    for sequence in result.sequences:
        item = response.sequences.add()
        item.stop_reason = pb.STOP_REASON_STOP if sequence.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        item.tokens = _pack("i", sequence.tokens)
        item.logprobs = _pack("f", sequence.logprobs)
    if result.prompt_logprobs is not None:
        response.prompt_logprobs = _pack("f", [math.nan if v is None else v for v in result.prompt_logprobs])
    return response.SerializeToString()
