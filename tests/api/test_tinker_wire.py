"""api.tinker.wire against the SDK's own encoders and decoders (tinker.proto): what the SDK sends decodes into
the service's shapes, and what the service answers decodes in the SDK as the values it was built from."""

from __future__ import annotations

import math

import pytest
from tinker import types
from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from api.tinker.wire import WireError, decode_forward_backward, encode_forward_result, encode_sample_result
from shared.tinker_ops import ForwardResult, SampledSequence, SampleResult


def _request(data: list[types.Datum], **config: float | str) -> bytes:
    request = types.ForwardBackwardRequest(
        model_id="s:train:0",
        seq_id=7,
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="ppo", loss_fn_config=config or None),
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def test_a_request_the_sdk_encodes_decodes_into_tokens_and_inputs() -> None:
    dense = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[6, 7, 8], dtype="int64"),
            "advantages": types.TensorData(data=[0.5, -1.0, 2.0], dtype="float32"),
        },
    )
    sparse = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3])]
        ),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[2, 3, 4], dtype="int64"),
            # CSR of one row: only position 1 is non-zero
            "logprobs": types.TensorData(
                data=[-0.25], dtype="float32", shape=[1, 3], sparse_crow_indices=[0, 1], sparse_col_indices=[1]
            ),
        },
    )
    wire = decode_forward_backward(_request([dense, sparse], clip_low_threshold=0.7, clip_high_threshold=1.3))
    assert (wire.model_id, wire.seq_id, wire.loss_fn, wire.forward_only) == ("s:train:0", 7, "ppo", False)
    assert wire.loss_fn_config == pytest.approx({"clip_low_threshold": 0.7, "clip_high_threshold": 1.3})
    assert wire.data[0].tokens == [5, 6, 7]
    assert wire.data[0].inputs["target_tokens"] == [6, 7, 8]
    assert wire.data[0].dtypes == {"target_tokens": "int64", "advantages": "float32"}
    assert wire.data[0].inputs["advantages"] == pytest.approx([0.5, -1.0, 2.0])
    assert wire.data[1].tokens == [1, 2, 3]
    assert wire.data[1].inputs["logprobs"] == pytest.approx([0.0, -0.25, 0.0])


def test_an_image_chunk_is_reported_not_dropped() -> None:
    image = types.Datum(
        model_input=types.ModelInput(chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=[1, 2, 3, 4], dtype="int64")},
    )
    wire = decode_forward_backward(_request([image]))
    assert wire.data[0].unsupported_chunks == ["data[0].model_input[0] (image chunk)"]


def test_a_body_that_is_not_the_protobuf_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="ForwardBackwardRequest"):
        decode_forward_backward(b"\xff\xff\xff not protobuf")


def test_a_forward_result_decodes_in_the_sdk_and_its_metrics_reduce() -> None:
    result = ForwardResult(
        loss_fn_outputs=[
            {"logprobs": [-1.0, -2.0, -0.5], "elementwise_loss": [1.0, 2.0, 0.5]},
            {"logprobs": [-3.0], "elementwise_loss": [3.0]},
        ],
        metrics={"loss:sum": 6.5, "tokens": 4.0},  # a key without its reduction gets one
    )
    output = deserialize_forward_backward_output(encode_forward_result(result))
    assert output.loss_fn_output_type == "ArrayRecord"
    assert [o["logprobs"].tolist() for o in output.loss_fn_outputs] == [[-1.0, -2.0, -0.5], [-3.0]]
    assert [o["elementwise_loss"].tolist() for o in output.loss_fn_outputs] == [[1.0, 2.0, 0.5], [3.0]]
    combined = combine_fwd_bwd_output_results([output, output])  # what the SDK does with every result
    assert combined.metrics["loss:sum"] == pytest.approx(13.0)
    assert combined.metrics["tokens:sum"] == pytest.approx(8.0)


def test_a_sample_result_decodes_in_the_sdk_with_none_where_no_logprob() -> None:
    result = SampleResult(
        sequences=[
            SampledSequence(tokens=[4, 5], logprobs=[-0.5, -1.5], stop_reason="length"),
            SampledSequence(tokens=[9], logprobs=[-0.25], stop_reason="stop"),
        ],
        prompt_logprobs=[None, -2.0, -3.0],
    )
    response = deserialize_sample_response(encode_sample_result(result))
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in response.sequences] == [
        ([4, 5], [-0.5, -1.5], "length"),
        ([9], [-0.25], "stop"),
    ]
    assert response.prompt_logprobs is not None
    assert response.prompt_logprobs[0] is None or math.isnan(response.prompt_logprobs[0])
    assert response.prompt_logprobs[1:] == [-2.0, -3.0]
    without = deserialize_sample_response(encode_sample_result(SampleResult(sequences=result.sequences)))
    assert without.prompt_logprobs is None
