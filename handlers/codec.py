"""Conversion between the Tinker wire formats and plain Python/numpy values.

This module's one job is translating bytes and JSON as the ``tinker`` SDK
(0.38.0) sends and expects them: the protobuf ``ForwardBackwardRequest``
(optionally zstd/gzip compressed) in, the protobuf ``ForwardBackwardOutput``
and ``SampleResponse`` out, and JSON ``ModelInput`` prompts of the sampling
endpoint. The schema is the SDK's own ``tinker.proto.tinker_public_pb2``; the
byte conventions mirror ``tinker/proto/request_conv.py`` and
``tinker/proto/response_conv.py``. No HTTP and no model code lives here.

Input problems raise ``WireFormatError`` (a ``ValueError``) whose message names
the datum and field at fault, so handlers can return it to the user verbatim.
Encoders raise plain ``ValueError`` for inconsistent server-side values.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb


MAX_TENSOR_CELLS = 1 << 24  # a densified sparse input may not be larger than this


class WireFormatError(ValueError):
    """The request bytes or JSON do not form a valid Tinker request."""


@dataclass
class DatumIn:
    tokens: np.ndarray  # int64 [L]: all encoded_text chunks concatenated in order
    loss_fn_inputs: dict[str, np.ndarray]  # int64/float32, shaped as declared; CSR densified


@dataclass
class ForwardBackwardIn:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str]  # legacy map merged with v2 (v2 wins)
    forward_only: bool
    data: list[DatumIn]


@dataclass
class SequenceOut:
    tokens: list[int] | np.ndarray
    logprobs: list[float] | np.ndarray
    stop_reason: str  # "stop" | "length"
    topk_logprobs: tuple[np.ndarray, np.ndarray] | None = None  # (token_ids [n,k], logprobs [n,k])


@dataclass
class TensorOut:
    """A response tensor: `values` flat in row-major order (dense) or the CSR values."""

    values: np.ndarray  # float32 or int64
    shape: list[int]
    csr: tuple[np.ndarray, np.ndarray] | None = None  # (crow_indices, col_indices) when sparse


# Wire dtype -> (little-endian dtype of the bytes, numpy dtype handed to callers).
# INT32 and BFLOAT16 are widened, as the SDK's response decoder does.
_WIRE_DTYPES = {
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), np.dtype(np.float32)),
    pb.DTYPE_INT64: (np.dtype("<i8"), np.dtype(np.int64)),
    pb.DTYPE_INT32: (np.dtype("<i4"), np.dtype(np.int64)),
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), np.dtype(np.float32)),
}
_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
_UNSUPPORTED_CHUNKS = {"image": "image", "image_asset_pointer": "image", "dmel": "dmel (audio)"}


# ---------------------------------------------------------------- forward_backward request


def decode_forward_backward(body: bytes, content_encoding: str | None) -> ForwardBackwardIn:
    """Parse a (possibly compressed) protobuf ``ForwardBackwardRequest`` body."""
    return forward_backward_from_message(parse_forward_backward(body, content_encoding))


def parse_forward_backward(body: bytes, content_encoding: str | None) -> pb.ForwardBackwardRequest:
    """Just the protobuf message: enough to know the model and seq_id before checking the data."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(_decompress(body, content_encoding))
    except DecodeError as e:
        raise WireFormatError(f"body is not a valid ForwardBackwardRequest protobuf: {e}") from e
    return msg


def forward_backward_from_message(msg: pb.ForwardBackwardRequest) -> ForwardBackwardIn:
    """The request's data as numpy arrays; WireFormatError names the datum and field at fault."""
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind is None:
            raise WireFormatError(f"loss_fn_config_v2[{key!r}] has neither a number nor a text value")
        config[key] = float(value.number) if kind == "number" else value.text

    return ForwardBackwardIn(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        forward_only=msg.forward_only,
        data=[_decode_datum(i, d) for i, d in enumerate(msg.data)],
    )


def _decompress(body: bytes, content_encoding: str | None) -> bytes:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding == "zstd":
        return _zstd_decompress(body)
    if encoding == "gzip":
        try:
            return gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as e:
            raise WireFormatError(f"body is not valid gzip data: {e}") from e
    raise WireFormatError(f"unsupported Content-Encoding {content_encoding!r} (use zstd, gzip or identity)")


def _zstd_decompress(body: bytes) -> bytes:
    # decompressobj streams, so frames without a content-size header work too;
    # loop because a body may hold several concatenated frames.
    out, rest = [], body
    while True:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        try:
            out.append(dobj.decompress(rest))
        except zstandard.ZstdError as e:
            raise WireFormatError(f"body is not valid zstd data: {e}") from e
        if not dobj.eof:
            raise WireFormatError("zstd body is truncated (frame does not end)")
        rest = dobj.unused_data
        if not rest:
            return b"".join(out)


def _decode_datum(i: int, datum: pb.Datum) -> DatumIn:
    pieces = []
    for j, chunk in enumerate(datum.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind in _UNSUPPORTED_CHUNKS:
            raise WireFormatError(
                f"datum {i}: {_UNSUPPORTED_CHUNKS[kind]} chunks are not supported by this server (text-only models)"
            )
        if kind is None:
            raise WireFormatError(f"datum {i}: model_input chunk {j} is empty")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise WireFormatError(
                f"datum {i}: model_input chunk {j}: {len(raw)} token bytes is not a multiple of 4 (int32)"
            )
        pieces.append(np.frombuffer(raw, dtype="<i4"))
    tokens = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)
    inputs = {
        name: _decode_tensor(tensor, f"datum {i}: loss_fn_inputs[{name!r}]")
        for name, tensor in datum.loss_fn_inputs.items()
    }
    return DatumIn(tokens=tokens, loss_fn_inputs=inputs)


def _values(raw: bytes, dtype: int, where: str, what: str) -> np.ndarray:
    if dtype not in _WIRE_DTYPES:
        raise WireFormatError(f"{where}: unsupported dtype {_dtype_name(dtype)}")
    wire, out = _WIRE_DTYPES[dtype]
    if len(raw) % wire.itemsize:
        raise WireFormatError(
            f"{where}: {what} has {len(raw)} bytes, not a multiple of {wire.itemsize} ({_dtype_name(dtype)})"
        )
    arr = np.frombuffer(raw, dtype=wire)
    if dtype == pb.DTYPE_BFLOAT16:  # bfloat16 = upper half of a float32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(out)  # copies: writable, native byte order


def _decode_tensor(t: pb.Tensor, where: str) -> np.ndarray:
    shape = list(t.shape)
    if any(s < 0 for s in shape):
        raise WireFormatError(f"{where}: negative dimension in shape {shape}")
    if t.WhichOneof("encoding") != "sparse_csr":
        values = _values(t.dense, t.dtype, where, "dense data")
        if not shape:
            return values
        if values.size != int(np.prod(shape)):
            raise WireFormatError(f"{where}: shape {shape} needs {int(np.prod(shape))} values, got {values.size}")
        return values.reshape(shape)

    if len(shape) != 2:
        raise WireFormatError(f"{where}: sparse CSR tensors must declare a 2-D shape, got {shape}")
    rows, cols = shape
    csr = t.sparse_csr
    values = _values(csr.values, t.dtype, where, "CSR values")
    crow = _values(csr.crow_indices, pb.DTYPE_INT64, where, "CSR crow_indices")
    col = _values(csr.col_indices, pb.DTYPE_INT64, where, "CSR col_indices")
    if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(values) or np.any(np.diff(crow) < 0):
        raise WireFormatError(
            f"{where}: CSR crow_indices must be {rows + 1} non-decreasing offsets from 0 to {len(values)} (nnz)"
        )
    if len(col) != len(values):
        raise WireFormatError(f"{where}: CSR has {len(col)} col_indices for {len(values)} values")
    if np.any((col < 0) | (col >= cols)):
        raise WireFormatError(f"{where}: CSR col_indices out of range [0, {cols})")
    if rows * cols > MAX_TENSOR_CELLS:
        raise WireFormatError(f"{where}: sparse shape {shape} has {rows * cols} cells; the limit is {MAX_TENSOR_CELLS}")
    dense = np.zeros((rows, cols), dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense


def _dtype_name(dtype: int) -> str:
    return pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)


# ---------------------------------------------------------------- forward_backward result


def encode_forward_backward_output(
    outputs: list[dict[str, np.ndarray]],
    metrics: dict[str, float],
    loss_fn_output_type: str = "ArrayRecord",
) -> bytes:
    """Serialize per-datum outputs as one ``ArrayRecord`` of a ``ForwardBackwardOutput``.

    Each field is a ``BatchedTensor``: all datums' values concatenated, int64
    *byte* offsets (num_datums + 1), and ``trailing_shape`` = ``arr.shape[1:]``.
    Floating arrays go out as FLOAT32, integer arrays as INT64.
    """
    for key in metrics:
        if key.count(":") != 1:  # the SDK splits merged-chunk metric keys on ':'
            raise ValueError(f"metric key {key!r} must look like 'name:reduction'")
    msg = pb.ForwardBackwardOutput(
        loss_fn_output_type=loss_fn_output_type, metrics={k: float(v) for k, v in metrics.items()}
    )
    record = msg.loss_fn_outputs.add(num_datums=len(outputs))
    names = set(outputs[0]) if outputs else set()
    for i, out in enumerate(outputs):
        if set(out) != names:
            raise ValueError(f"datum {i} has output fields {sorted(out)}, datum 0 has {sorted(names)}")
    for name in sorted(names):
        arrays = [np.asarray(out[name]) for out in outputs]
        record.fields[name].CopyFrom(_batched_tensor(name, arrays))
    return msg.SerializeToString()


def _batched_tensor(name: str, arrays: list[np.ndarray]) -> pb.BatchedTensor:
    kind = arrays[0].dtype.kind
    if kind == "f":
        wire, dtype = np.dtype("<f4"), pb.DTYPE_FLOAT32
    elif kind in "iu":
        wire, dtype = np.dtype("<i8"), pb.DTYPE_INT64
    else:
        raise ValueError(f"output {name!r}: unsupported dtype {arrays[0].dtype}")
    trailing = arrays[0].shape[1:]
    for i, arr in enumerate(arrays):
        if arr.ndim == 0 or arr.shape[1:] != trailing or arr.dtype.kind != kind:
            raise ValueError(
                f"output {name!r}: datum {i} is {arr.dtype} {arr.shape}, datum 0 is {arrays[0].dtype} "
                f"{arrays[0].shape}; all need at least 1 dim, the same trailing dims and dtype kind"
            )
    offsets = np.concatenate([[0], np.cumsum([arr.size * wire.itemsize for arr in arrays])])
    return pb.BatchedTensor(
        data=b"".join(arr.astype(wire).tobytes() for arr in arrays),
        offsets=offsets.astype("<i8").tobytes(),
        dtype=dtype,
        trailing_shape=trailing,
    )


# ---------------------------------------------------------------- sampling


def encode_sample_response(
    sequences: list[SequenceOut],
    prompt_logprobs: np.ndarray | None = None,
    topk_prompt_logprobs: tuple[np.ndarray, np.ndarray] | None = None,
    prompt_cache_hit_tokens: int = 0,
    target_prompt_logprobs: TensorOut | None = None,
    prompt_alt_tokens: tuple[np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """Serialize a protobuf ``SampleResponse``.

    ``prompt_logprobs`` holds one float per prompt position, NaN where not
    computed (the SDK shows those as ``None``). Top-k matrices are [n, k];
    empty cells are token 0 with logprob -99999.0. ``target_prompt_logprobs``
    keeps the request's shape and layout; ``prompt_alt_tokens`` is
    (token ids [n, k], logprobs [n, k]), sent as int64 and float32 tensors.
    """
    msg = pb.SampleResponse(prompt_cache_hit_tokens=prompt_cache_hit_tokens)
    for i, seq in enumerate(sequences):
        if seq.stop_reason not in _STOP_REASONS:
            raise ValueError(f"sequence {i}: stop_reason must be 'stop' or 'length', got {seq.stop_reason!r}")
        tokens = np.asarray(seq.tokens, dtype="<i4")
        logprobs = np.asarray(seq.logprobs, dtype="<f4")
        if tokens.shape != logprobs.shape or tokens.ndim != 1:
            raise ValueError(f"sequence {i}: {tokens.shape} tokens vs {logprobs.shape} logprobs")
        out = msg.sequences.add(
            stop_reason=_STOP_REASONS[seq.stop_reason], tokens=tokens.tobytes(), logprobs=logprobs.tobytes()
        )
        if seq.topk_logprobs is not None:
            out.topk_sampled_logprobs.CopyFrom(_topk(seq.topk_logprobs, f"sequence {i} topk_logprobs"))
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(prompt_logprobs, dtype="<f4").tobytes()
    if topk_prompt_logprobs is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk(topk_prompt_logprobs, "topk_prompt_logprobs"))
    if target_prompt_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(_tensor(target_prompt_logprobs))
    if prompt_alt_tokens is not None:
        ids, logprobs = (np.asarray(a) for a in prompt_alt_tokens)
        if ids.ndim != 2 or ids.shape != logprobs.shape:
            raise ValueError(f"prompt_alt_tokens: tokens {ids.shape} and logprobs {logprobs.shape} must both be [n, k]")
        msg.prompt_alt_tokens.tokens.CopyFrom(_tensor(TensorOut(ids.astype(np.int64).ravel(), list(ids.shape))))
        msg.prompt_alt_tokens.logprobs.CopyFrom(_tensor(TensorOut(logprobs.astype(np.float32).ravel(), list(ids.shape))))
    return msg.SerializeToString()


def _tensor(t: TensorOut) -> pb.Tensor:
    values = np.asarray(t.values)
    wire, dtype = (np.dtype("<f4"), pb.DTYPE_FLOAT32) if values.dtype.kind == "f" else (np.dtype("<i8"), pb.DTYPE_INT64)
    msg = pb.Tensor(dtype=dtype, shape=t.shape)
    if t.csr is None:
        if values.size != int(np.prod(t.shape)):
            raise ValueError(f"tensor of shape {t.shape} needs {int(np.prod(t.shape))} values, got {values.size}")
        msg.dense = values.astype(wire).tobytes()
    else:
        crow, col = (np.asarray(a, dtype="<i8") for a in t.csr)
        msg.sparse_csr.CopyFrom(pb.SparseCsr(values=values.astype(wire).tobytes(), crow_indices=crow.tobytes(),
                                             col_indices=col.tobytes()))
    return msg


def _topk(pair: tuple[np.ndarray, np.ndarray], what: str) -> pb.TopkLogprobs:
    ids, logprobs = np.asarray(pair[0], dtype="<i4"), np.asarray(pair[1], dtype="<f4")
    if ids.ndim != 2 or ids.shape != logprobs.shape:
        raise ValueError(f"{what}: token_ids {ids.shape} and logprobs {logprobs.shape} must both be [n, k]")
    n, k = ids.shape
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=logprobs.tobytes(), length=n, k=k)


def model_input_tokens(model_input: dict) -> list[int]:
    """Concatenate the ``encoded_text`` chunks of a JSON ``ModelInput``."""
    chunks = model_input.get("chunks") if isinstance(model_input, dict) else None
    if not isinstance(chunks, list):
        raise WireFormatError("model input must be an object with a 'chunks' list")
    tokens: list[int] = []
    for j, chunk in enumerate(chunks):
        if not isinstance(chunk, dict):
            raise WireFormatError(f"chunk {j} must be an object, got {type(chunk).__name__}")
        kind = chunk.get("type", "encoded_text")
        if kind in _UNSUPPORTED_CHUNKS:
            raise WireFormatError(
                f"chunk {j}: {_UNSUPPORTED_CHUNKS[kind]} chunks are not supported by this server (text-only models)"
            )
        if kind != "encoded_text":
            raise WireFormatError(f"chunk {j}: unknown chunk type {kind!r}")
        ids = chunk.get("tokens")
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise WireFormatError(f"chunk {j}: 'tokens' must be a list of integers")
        tokens.extend(ids)
    return tokens
