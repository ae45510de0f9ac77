"""Open Inference Protocol v2 tensors and parameters <-> numpy, with errors that name the bad field.

Shared by the server and the client. Raw contents are little-endian and row-major; a BYTES tensor's raw form is
each element as a 4-byte little-endian length followed by its bytes (the protocol's convention).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import grpc
import numpy as np

from ponder.errors import ECHO_CHARS, cut, echo  # noqa: F401 (re-exported: the server's messages use them)

# datatype -> (numpy dtype, the InferTensorContents field that carries it typed)
DATATYPES: dict[str, tuple[Any, str]] = {
    "BOOL": (np.bool_, "bool_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "FP16": (np.float16, ""),  # raw only: the protocol has no typed field for it
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "BYTES": (np.object_, "bytes_contents"),
}
NUMPY_TO_DATATYPE = {np.dtype(d): name for name, (d, _) in DATATYPES.items() if name != "BYTES"}


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _count(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def decode_tensor(tensor: Any, raw: bytes | None, field: str) -> np.ndarray:
    """An input tensor (typed ``contents`` or ``raw`` bytes) as a numpy array of its declared shape."""
    shape = [int(d) for d in tensor.shape]
    if any(d < 0 for d in shape):
        raise invalid(f"{field}: shape {echo(shape)} has a negative dimension")
    if tensor.datatype not in DATATYPES:
        raise invalid(f"{field}: datatype {echo(tensor.datatype)} is not one of {', '.join(DATATYPES)}")
    dtype, typed_field = DATATYPES[tensor.datatype]
    typed = [f.name for f, _ in tensor.contents.ListFields()]  # the *_contents fields with values in them
    if typed and raw is not None:
        raise invalid(f"{field}: has both typed contents ({', '.join(typed)}) and raw contents; send one of them")
    if any(name != typed_field for name in typed):
        want = f"contents.{typed_field}" if typed_field else "raw contents"
        raise invalid(f"{field}: {tensor.datatype} travels in {want}, not in {', '.join(typed)}")
    count = _count(shape)
    if tensor.datatype == "BYTES":
        items = _split_bytes(raw, field) if raw is not None else list(tensor.contents.bytes_contents)
        if len(items) != count:
            raise invalid(f"{field}: holds {len(items)} strings, but shape {echo(shape)} needs {count}")
        out = np.empty(count, dtype=np.object_)
        out[:] = items
        return out.reshape(shape)
    if raw is not None:
        need = count * np.dtype(dtype).itemsize
        if len(raw) != need:
            raise invalid(f"{field}: raw contents hold {len(raw)} bytes, but shape {echo(shape)} of {tensor.datatype} "
                          f"needs {need}")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
    if not typed_field:
        raise invalid(f"{field}: {tensor.datatype} can only be sent as raw contents")
    values = getattr(tensor.contents, typed_field)
    if len(values) != count:
        raise invalid(f"{field}: contents.{typed_field} holds {len(values)} values, but shape {echo(shape)} "
                      f"needs {count}")
    return np.array(values, dtype=dtype).reshape(shape)


def _split_bytes(raw: bytes, field: str) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise invalid(f"{field}: raw BYTES contents end inside a 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise invalid(f"{field}: raw BYTES element of {size} bytes runs past the end of the contents")
        items.append(raw[pos:pos + size])
        pos += size
    return items


def encode_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the protocol's raw form (each a 4-byte little-endian length, then the bytes)."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def add_output(response: Any, name: str, array: np.ndarray) -> None:
    """Append ``array`` to a ModelInferResponse as output ``name`` with raw contents (as Triton does)."""
    out = response.outputs.add(name=name, shape=list(array.shape))
    if array.dtype == np.object_:
        out.datatype = "BYTES"
        response.raw_output_contents.append(encode_bytes([bytes(b) for b in array.reshape(-1)]))
        return
    out.datatype = NUMPY_TO_DATATYPE[array.dtype]
    response.raw_output_contents.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())


def output_arrays(response: Any) -> dict[str, np.ndarray]:
    """The outputs of a ModelInferResponse as numpy arrays, raw or typed."""
    arrays = {}
    for i, out in enumerate(response.outputs):
        raw = response.raw_output_contents[i] if i < len(response.raw_output_contents) else None
        arrays[out.name] = decode_tensor(out, raw, f"output {echo(out.name)}")
    return arrays


def param_value(param: Any) -> bool | int | float | str | None:
    """An InferParameter's value, whichever field is set."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def set_param(params: Any, key: str, value: bool | int | float | str) -> None:
    """Set a parameter map entry with the field that fits the value's type."""
    if isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    elif isinstance(value, float):
        params[key].double_param = value
    else:
        params[key].string_param = str(value)


def read_number(params: Any, key: str, *, integer: bool = False) -> float | int | None:
    """A numeric request parameter, or None when absent; any other type is refused by name.

    A number written as a string ("0.5") is accepted too: KServe's protocol has no double_param, so its Python SDK
    sends floats as string_param."""
    if key not in params:
        return None
    which = params[key].WhichOneof("parameter_choice")
    value = param_value(params[key])
    if which in ("int64_param", "uint64_param") or (which == "double_param" and not integer):
        return value  # type: ignore[return-value]
    want = "an integer (int64_param, or a string such as '16')" if integer else \
        "a number (double_param, int64_param, or a string such as '0.5')"
    if which == "string_param":
        number = _parse_number(value.strip(), integer)  # type: ignore[union-attr]
        if number is not None:
            return number
    got = "nothing" if which is None else f"{which}={echo(value)}"
    raise invalid(f"parameter {key!r} must be {want}, got {got}")


def _parse_number(text: str, integer: bool) -> float | int | None:
    if len(text) > 64:
        return None
    try:
        return int(text) if integer else float(text)
    except ValueError:
        return None
