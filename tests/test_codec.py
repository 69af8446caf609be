"""handlers.codec round-trips through the tinker SDK's own (de)serializers."""

import gzip
import math

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker._compat import model_dump
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from handlers.codec import (
    SequenceOut,
    WireFormatError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
    model_input_tokens,
)


def sdk_request(data, loss_fn="cross_entropy", config=None, forward_only=False) -> pb.ForwardBackwardRequest:
    """The proto message exactly as tinker/resources/training.py builds it."""
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="sess:train:0",
        seq_id=7,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg


def text_datum(tokens=(1, 2, 3)):
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(tokens)),
        loss_fn_inputs={"target_tokens": list(tokens), "weights": [1.0] * len(tokens)},
    )


def tensor_msg(dtype, raw: bytes, shape=()) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id="m", loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.arange(4, dtype="<i4").tobytes()
    datum.loss_fn_inputs["x"].CopyFrom(pb.Tensor(dense=raw, dtype=dtype, shape=shape))
    return msg.SerializeToString()


# ------------------------------------------------------------------ requests


def test_decode_dense_and_sdk_sparse_csr():
    targets = torch.zeros(4, 8, dtype=torch.int64)
    targets[0, 1], targets[2, 5], targets[3, 0] = 11, 22, 33
    weights = torch.zeros(4, 8)
    weights[1, 3] = 0.5
    datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[5, 6]), types.EncodedTextChunk(tokens=[7, 100_000])]
        ),
        loss_fn_inputs={"target_tokens": targets, "weights": weights, "advantages": [0.5, -1.0, 2.0, 0.0]},
    )
    # The SDK picks CSR on its own for 2-D target_tokens/weights when that is smaller.
    assert datum.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None
    assert datum.loss_fn_inputs["weights"].sparse_crow_indices is not None
    msg = sdk_request([text_datum(), datum])
    assert msg.data[1].loss_fn_inputs["target_tokens"].WhichOneof("encoding") == "sparse_csr"

    fb = decode_forward_backward(msg.SerializeToString(), None)

    assert (fb.model_id, fb.seq_id, fb.loss_fn, fb.forward_only) == ("sess:train:0", 7, "cross_entropy", False)
    assert fb.loss_fn_config == {}
    first, second = fb.data
    assert first.tokens.dtype == np.int64 and first.tokens.tolist() == [1, 2, 3]
    assert first.loss_fn_inputs["target_tokens"].dtype == np.int64
    assert first.loss_fn_inputs["weights"].dtype == np.float32
    assert first.loss_fn_inputs["weights"].shape == (3,)
    assert second.tokens.tolist() == [5, 6, 7, 100_000]
    for name, expected in [("target_tokens", targets), ("weights", weights)]:
        got = second.loss_fn_inputs[name]
        assert got.shape == (4, 8) and got.dtype == expected.numpy().dtype
        np.testing.assert_array_equal(got, expected.numpy())
        np.testing.assert_array_equal(got, datum.loss_fn_inputs[name].to_numpy())  # the SDK's own densify
    np.testing.assert_array_equal(second.loss_fn_inputs["advantages"], np.float32([0.5, -1.0, 2.0, 0.0]))
    assert second.loss_fn_inputs["advantages"].flags.writeable


def test_dense_2d_keeps_declared_shape():
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": torch.arange(1, 7).reshape(2, 3)},  # dense: CSR would be larger
    )
    assert datum.loss_fn_inputs["target_tokens"].sparse_crow_indices is None
    got = decode_forward_backward(sdk_request([datum]).SerializeToString(), None).data[0]
    np.testing.assert_array_equal(got.loss_fn_inputs["target_tokens"], np.arange(1, 7).reshape(2, 3))


def test_loss_fn_config_dual_write_and_forward_only():
    config = {"clip_low_threshold": 0.8, "beta": 2, "loss_id": "loss-123"}
    msg = sdk_request([text_datum()], loss_fn="custom", config=config, forward_only=True)
    assert "loss_id" not in msg.loss_fn_config and "loss_id" in msg.loss_fn_config_v2
    fb = decode_forward_backward(msg.SerializeToString(), "identity")
    assert fb.forward_only and fb.loss_fn == "custom"
    assert fb.loss_fn_config == {"clip_low_threshold": 0.8, "beta": 2.0, "loss_id": "loss-123"}
    assert isinstance(fb.loss_fn_config["beta"], float)


def test_loss_fn_config_v2_wins_and_legacy_only_works():
    msg = pb.ForwardBackwardRequest(model_id="m", loss_fn="ppo", loss_fn_config={"a": 1.0, "b": 3.0})
    msg.loss_fn_config_v2["a"].number = 2.0
    assert decode_forward_backward(msg.SerializeToString(), None).loss_fn_config == {"a": 2.0, "b": 3.0}


@pytest.mark.parametrize(
    "compress, encoding",
    [
        (zstandard.ZstdCompressor().compress, "zstd"),  # what the SDK does
        (zstandard.ZstdCompressor(write_content_size=False).compress, "zstd"),  # no size in header
        (lambda b: zstandard.ZstdCompressor().compress(b[:10]) + zstandard.ZstdCompressor().compress(b[10:]), "zstd"),
        (gzip.compress, "gzip"),
    ],
)
def test_compressed_bodies(compress, encoding):
    body = sdk_request([text_datum(range(50)), text_datum()]).SerializeToString()
    fb = decode_forward_backward(compress(body), encoding)
    assert [d.tokens.tolist() for d in fb.data] == [list(range(50)), [1, 2, 3]]


def test_int32_and_bfloat16_are_widened():
    fb = decode_forward_backward(tensor_msg(pb.DTYPE_INT32, np.int32([-1, 2, 3]).tobytes()), None)
    x = fb.data[0].loss_fn_inputs["x"]
    assert x.dtype == np.int64 and x.tolist() == [-1, 2, 3]
    bf16 = (np.float32([1.5, -2.0]).view(np.uint32) >> 16).astype("<u2").tobytes()
    x = decode_forward_backward(tensor_msg(pb.DTYPE_BFLOAT16, bf16, [2, 1]), None).data[0].loss_fn_inputs["x"]
    assert x.dtype == np.float32 and x.shape == (2, 1) and x.ravel().tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    "chunk, message",
    [
        (types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=3), "datum 1: image chunks are not supported"),
        (types.DmelChunk(dmel=b"\x00" * 8), "datum 1: dmel \\(audio\\) chunks are not supported"),
    ],
)
def test_non_text_chunks_rejected(chunk, message):
    datum = types.Datum(model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1]), chunk]))
    with pytest.raises(WireFormatError, match=message):
        decode_forward_backward(sdk_request([text_datum(), datum]).SerializeToString(), None)


def test_malformed_bodies():
    good = sdk_request([text_datum()]).SerializeToString()
    compressed = zstandard.ZstdCompressor().compress(good)
    cases = [
        (b"\xff\xff\xff\xff", None, "not a valid ForwardBackwardRequest"),
        (good[:-3], None, "not a valid ForwardBackwardRequest"),
        (b"not zstd at all", "zstd", "not valid zstd"),
        (compressed[:-4], "zstd", "truncated"),
        (b"", "zstd", "truncated"),
        (b"junk", "gzip", "not valid gzip"),
        (good, "br", "unsupported Content-Encoding 'br'"),
    ]
    for body, encoding, message in cases:
        with pytest.raises(WireFormatError, match=message):
            decode_forward_backward(body, encoding)


def _csr_body(crow, col, values, shape) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id="m", loss_fn="cross_entropy")
    t = msg.data.add().loss_fn_inputs["target_tokens"]
    t.dtype, t.shape[:] = pb.DTYPE_INT64, shape
    t.sparse_csr.crow_indices = np.int64(crow).tobytes()
    t.sparse_csr.col_indices = np.int64(col).tobytes()
    t.sparse_csr.values = np.int64(values).tobytes()
    return msg.SerializeToString()


@pytest.mark.parametrize(
    "body, message",
    [
        (tensor_msg(pb.DTYPE_FLOAT32, np.float32([1, 2, 3]).tobytes(), [2, 2]), r"shape \[2, 2\] needs 4 values, got 3"),
        (tensor_msg(pb.DTYPE_FLOAT32, b"\x00" * 5), "5 bytes, not a multiple of 4"),
        (tensor_msg(pb.DTYPE_UNSPECIFIED, b""), "unsupported dtype DTYPE_UNSPECIFIED"),
        (tensor_msg(pb.DTYPE_INT64, b"", [-1]), "negative dimension"),
        (_csr_body([0, 1], [0], [5], [2, 2]), "crow_indices must be 3"),
        (_csr_body([0, 1, 2], [0], [5, 6], [2, 2]), "1 col_indices for 2 values"),
        (_csr_body([0, 1, 1], [2], [5], [2, 2]), r"col_indices out of range \[0, 2\)"),
        (_csr_body([0, 1], [0], [5], [2]), "2-D shape"),
        (pb.ForwardBackwardRequest(data=[pb.Datum(model_input=[pb.Chunk()])]).SerializeToString(), "chunk 0 is empty"),
    ],
)
def test_bad_tensors_name_datum_and_field(body, message):
    with pytest.raises(WireFormatError, match=message) as err:
        decode_forward_backward(body, None)
    assert str(err.value).startswith("datum 0")


def test_bad_token_bytes():
    msg = pb.ForwardBackwardRequest(data=[pb.Datum(), pb.Datum()])
    msg.data[1].model_input.add().encoded_text.tokens = b"\x01\x00\x00"
    with pytest.raises(WireFormatError, match="datum 1: model_input chunk 0: 3 token bytes"):
        decode_forward_backward(msg.SerializeToString(), None)


# ------------------------------------------------------------------ forward/backward output


def test_forward_backward_output_roundtrip():
    outputs = [
        {
            "logprobs": np.float32([-0.5, -1.25, -3.0]),
            "elementwise_loss": np.float64([0.5, 1.25, 3.0]),  # float64 goes out as float32
            "topk": np.arange(6, dtype=np.int64).reshape(3, 2),
        },
        {
            "logprobs": np.float32([-2.0]),
            "elementwise_loss": np.float32([2.0]),
            "topk": np.int64([[7, 8]]),
        },
    ]
    metrics = {"loss:sum": 7.0, "tokens:sum": 4}
    out = deserialize_forward_backward_output(encode_forward_backward_output(outputs, metrics))

    assert out.loss_fn_output_type == "ArrayRecord"
    assert out.metrics == {"loss:sum": 7.0, "tokens:sum": 4.0}
    assert len(out.loss_fn_outputs) == 2
    for sent, got in zip(outputs, out.loss_fn_outputs):
        assert set(got) == set(sent)
        for name, arr in sent.items():
            assert got[name].dtype == ("int64" if arr.dtype.kind == "i" else "float32")
            assert got[name].shape == list(arr.shape)
            np.testing.assert_array_equal(got[name].to_numpy(), arr)


def test_forward_backward_output_empty_and_type_name():
    out = deserialize_forward_backward_output(encode_forward_backward_output([], {"loss:sum": 0.0}, "pkg:MyOutput"))
    assert out.loss_fn_outputs == [] and out.metrics == {"loss:sum": 0.0}
    out = deserialize_forward_backward_output(
        encode_forward_backward_output([{"logprobs": np.float32([0.0])}], {}, "pkg:MyOutput")
    )
    assert out.loss_fn_output_type == "MyOutput"


@pytest.mark.parametrize(
    "outputs, metrics, message",
    [
        ([{"logprobs": np.float32([1])}, {"loss": np.float32([1])}], {}, "datum 1 has output fields"),
        ([{"x": np.float32([[1, 2]])}, {"x": np.float32([[1, 2, 3]])}], {}, "datum 1 is float32 \\(1, 3\\)"),
        ([{"x": np.float32(1.0)}], {}, "at least 1 dim"),
        ([{"x": np.array(["a"])}], {}, "unsupported dtype"),
        ([], {"loss": 1.0}, "name:reduction"),
        ([], {"a:b:sum": 1.0}, "name:reduction"),
    ],
)
def test_forward_backward_output_rejects_inconsistent_values(outputs, metrics, message):
    with pytest.raises(ValueError, match=message):
        encode_forward_backward_output(outputs, metrics)


# ------------------------------------------------------------------ sampling


def test_sample_response_roundtrip():
    topk_ids = np.int32([[5, 6], [9, 0]])
    topk_lps = np.float32([[-0.1, -2.0], [-0.3, -99999.0]])  # second row padded with the mask cell
    prompt_topk = (np.int32([[0, 0], [3, 4], [2, 0]]), np.float32([[-99999.0] * 2, [-0.5, -1.0], [-0.25, -99999.0]]))
    body = encode_sample_response(
        [
            SequenceOut(tokens=[5, 9], logprobs=[-0.1, -0.3], stop_reason="stop", topk_logprobs=(topk_ids, topk_lps)),
            SequenceOut(tokens=np.int64([1, 2, 3]), logprobs=np.float32([-1, -2, -3]), stop_reason="length"),
        ],
        prompt_logprobs=np.float32([np.nan, -1.5, -2.0]),
        topk_prompt_logprobs=prompt_topk,
        prompt_cache_hit_tokens=2,
    )
    resp = deserialize_sample_response(body)

    first, second = resp.sequences
    assert (first.stop_reason, second.stop_reason) == ("stop", "length")
    assert first.tokens == [5, 9] and second.tokens == [1, 2, 3]
    assert first.logprobs == pytest.approx([-0.1, -0.3]) and second.logprobs == [-1.0, -2.0, -3.0]
    assert first.topk_logprobs == [[(5, pytest.approx(-0.1)), (6, -2.0)], [(9, pytest.approx(-0.3))]]
    assert second.topk_logprobs is None
    assert resp.prompt_logprobs == [None, -1.5, -2.0]
    assert math.isnan(resp.prompt_logprobs_np[0])
    assert resp.topk_prompt_logprobs == [None, [(3, -0.5), (4, -1.0)], [(2, -0.25)]]
    assert resp.prompt_cache_hit_tokens == 2


def test_sample_response_without_prompt_logprobs():
    resp = deserialize_sample_response(encode_sample_response([SequenceOut([4], [-0.5], "length")]))
    assert resp.prompt_logprobs is None and resp.topk_prompt_logprobs is None
    assert resp.sequences[0].logprobs == [-0.5]


@pytest.mark.parametrize(
    "seq, message",
    [
        (SequenceOut([1], [-1.0], "eos"), "stop_reason must be"),
        (SequenceOut([1, 2], [-1.0], "stop"), "tokens vs"),
        (SequenceOut([1], [-1.0], "stop", (np.int32([1]), np.float32([-1.0]))), r"must both be \[n, k\]"),
    ],
)
def test_sample_response_rejects_bad_sequences(seq, message):
    with pytest.raises(ValueError, match=message):
        encode_sample_response([seq])


def test_model_input_tokens_from_sdk_json():
    prompt = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3])])
    request = types.SampleRequest(prompt=prompt, sampling_params=types.SamplingParams(max_tokens=4), num_samples=1)
    body = model_dump(request, exclude_unset=False, exclude_none=True, mode="json")  # as resources/sampling.py
    assert model_input_tokens(body["prompt"]) == [1, 2, 3]

    with_image = model_dump(prompt.append(types.ImageChunk(data=b"x", format="png", expected_tokens=2)), mode="json")
    with pytest.raises(WireFormatError, match="chunk 2: image chunks are not supported"):
        model_input_tokens(with_image)


@pytest.mark.parametrize(
    "model_input, message",
    [
        ([1, 2], "'chunks' list"),
        ({"chunks": "abc"}, "'chunks' list"),
        ({"chunks": [7]}, "chunk 0 must be an object"),
        ({"chunks": [{"type": "video"}]}, "unknown chunk type 'video'"),
        ({"chunks": [{"type": "encoded_text", "tokens": [1, "2"]}]}, "list of integers"),
        ({"chunks": [{"type": "encoded_text", "tokens": [1.5]}]}, "list of integers"),
        ({"chunks": [{"type": "encoded_text"}]}, "list of integers"),
    ],
)
def test_model_input_tokens_rejects_malformed(model_input, message):
    with pytest.raises(WireFormatError, match=message):
        model_input_tokens(model_input)
