"""The Open Inference Protocol's HTTP/REST bodies <-> the gRPC messages the servicer answers.

The HTTP front end turns every request into the gRPC message the servicer already answers, and every answer back,
so both protocols share one path (parsing, limits, the scheduler, the statistics). Tensors travel as JSON
(``data``, row-major, nested or flat) or, with Triton's binary tensor extension, as raw bytes after the JSON
header (``Inference-Header-Content-Length`` says where the JSON ends; ``binary_data_size`` in a tensor's
parameters says how many bytes are its).
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from ponder.serve import inference_pb2 as pb
from ponder.serve.protocol import (
    DATATYPES,
    RequestError,
    echo,
    encode_bytes,
    invalid,
    output_arrays,
    param_value,
    set_param,
)

HEADER_LENGTH = "Inference-Header-Content-Length"

# gRPC status -> HTTP status (KServe's and Triton's HTTP servers answer these)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.FAILED_PRECONDITION: 409,
}


def message_json(message: Any) -> dict[str, Any]:
    """A protobuf message as the protocol's JSON: field names as in the .proto, every field present, 64-bit
    integers as numbers (json_format writes them as strings)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, data)


_INT64 = {"int64", "uint64", "sint64", "fixed64", "sfixed64"}


def _numbers(descriptor: Any, data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    data[field.name] = {k: _numbers(value_field.message_type, v) for k, v in value.items()}
            elif isinstance(value, list):
                data[field.name] = [_numbers(field.message_type, v) for v in value]
            else:
                data[field.name] = _numbers(field.message_type, value)
        elif _type_name(field) in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def _type_name(field: Any) -> str:
    from google.protobuf.descriptor import FieldDescriptor

    names = {FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_UINT64: "uint64",
             FieldDescriptor.TYPE_SINT64: "sint64", FieldDescriptor.TYPE_FIXED64: "fixed64",
             FieldDescriptor.TYPE_SFIXED64: "sfixed64"}
    return names.get(field.type, "")


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header of a request body (an object) and the binary data after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise invalid(f"header {HEADER_LENGTH} must be a whole number, got {echo(header_length)}") from None
        if not 0 <= n <= len(body):
            raise invalid(f"header {HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    try:
        data = json.loads(json_part or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    return data, binary


def infer_request(name: str, version: str, data: dict[str, Any], binary: bytes) -> tuple[Any, dict[str, bool]]:
    """The ModelInferRequest of an HTTP infer body, and which outputs the client wants as binary data."""
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=str(data.get("id", "")))
    _parameters(request.parameters, data.get("parameters"), "parameters")
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("'inputs' must be a non-empty list of tensors ({name, shape, datatype, data})")
    offset = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise invalid(f"{where} must be an object, got {type(tensor).__name__}")
        name_, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name_, str) or not isinstance(datatype, str) or not isinstance(shape, list) or \
                not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise invalid(f"{where} needs 'name' (text), 'datatype' (text) and 'shape' (a list of whole numbers)")
        if datatype not in DATATYPES:
            raise invalid(f"{where}: datatype {echo(datatype)} is not one of {', '.join(DATATYPES)}")
        request.inputs.add(name=name_, datatype=datatype, shape=shape)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise invalid(f"{where}: binary_data_size {echo(size)} runs past the {len(binary)} bytes of binary "
                              f"data")
            request.raw_input_contents.append(binary[offset:offset + size])
            offset += size
        else:
            if "data" not in tensor:
                raise invalid(f"{where} ({echo(name_)}) has neither 'data' nor parameters.binary_data_size")
            request.raw_input_contents.append(_raw(tensor["data"], datatype, f"{where} ({echo(name_)})"))
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data are not claimed by any input's binary_data_size")
    binary_default = bool((data.get("parameters") or {}).get("binary_data_output", False))
    wanted: dict[str, bool] = {}
    outputs = data.get("outputs") or []
    if not isinstance(outputs, list):
        raise invalid("'outputs' must be a list of {name, parameters}")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise invalid(f"outputs[{i}] must be an object with a 'name'")
        request.outputs.add(name=out["name"])
        wanted[out["name"]] = bool((out.get("parameters") or {}).get("binary_data", binary_default))
    wanted[""] = binary_default  # for outputs not named
    return request, wanted


def _raw(data: Any, datatype: str, where: str) -> bytes:
    dtype = DATATYPES[datatype][0]
    if datatype == "BYTES":
        items = np.asarray(data, dtype=object).reshape(-1)
        return encode_bytes([v.encode() if isinstance(v, str) else bytes(v) for v in items])
    try:
        return np.asarray(data, dtype=dtype).reshape(-1).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    except (TypeError, ValueError, OverflowError) as exc:
        raise invalid(f"{where}: 'data' is not a list of {datatype} values ({exc})") from None


def _parameters(target: Any, values: Any, where: str) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise invalid(f"{where} must be an object, got {type(values).__name__}")
    for key, value in values.items():
        if key in ("binary_data_output", "binary_data", "binary_data_size"):
            continue  # the binary extension's, read where they apply
        if not isinstance(value, (bool, int, float, str)):
            raise invalid(f"{where}.{echo(key)} must be a boolean, a number or text, got {type(value).__name__}")
        set_param(target, key, value)


def infer_response(response: Any, binary_outputs: dict[str, bool]) -> tuple[bytes, int | None]:
    """The HTTP body of a ModelInferResponse and, when some output travels as binary data, the JSON header's
    length (for ``Inference-Header-Content-Length``)."""
    outputs, blobs = [], []
    for name, array in output_arrays(response).items():
        shape = list(array.shape)
        entry: dict[str, Any] = {"name": name, "datatype": _datatype(response, name), "shape": shape}
        if binary_outputs.get(name, binary_outputs.get("", False)):
            blob = encode_bytes([bytes(b) for b in array.reshape(-1)]) if array.dtype == object else \
                np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = array.reshape(-1)
            entry["data"] = [bytes(b).decode("utf-8", "replace") for b in flat] if array.dtype == object else \
                flat.tolist()
        outputs.append(entry)
    head = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs,
            "parameters": {k: param_value(v) for k, v in response.parameters.items()}}
    if response.id:
        head["id"] = response.id
    text = json.dumps(head).encode()
    return (text + b"".join(blobs), len(text)) if blobs else (text, None)


def _datatype(response: Any, name: str) -> str:
    return next(o.datatype for o in response.outputs if o.name == name)


def generate_request(name: str, version: str, data: dict[str, Any], stream: bool) -> Any:
    """Triton's generate extension: the body's keys are inputs by name (``text_input``, ...), its ``parameters``
    the request's parameters, where sampling keys are gathered into ``sampling_parameters``."""
    from ponder.generation import SAMPLING_KEYS

    request = pb.ModelInferRequest(model_name=name, model_version=version, id=str(data.get("id", "")))
    params = dict(data.get("parameters") or {})
    if not isinstance(data.get("parameters") or {}, dict):
        raise invalid("'parameters' must be an object")
    sampling = {k: params.pop(k) for k in list(params) if k in SAMPLING_KEYS}
    _parameters(request.parameters, {k: v for k, v in params.items() if k != "stream"}, "parameters")
    values = {k: v for k, v in data.items() if k not in ("id", "parameters")}
    if "sampling_parameters" in values and sampling:
        raise invalid("give sampling either as 'sampling_parameters' or in 'parameters', not both")
    if sampling:
        values["sampling_parameters"] = json.dumps(sampling)
    values["stream"] = stream
    for key, value in values.items():
        if isinstance(value, bool):
            tensor = request.inputs.add(name=key, datatype="BOOL", shape=[1])
            tensor.contents.bool_contents.append(value)
        elif isinstance(value, str):
            tensor = request.inputs.add(name=key, datatype="BYTES", shape=[1])
            tensor.contents.bytes_contents.append(value.encode())
        else:
            raise invalid(f"{echo(key)} must be text or a boolean (generate takes text_input, "
                          f"sampling_parameters, exclude_input_in_output), got {type(value).__name__}")
    return request


def generate_response(response: Any) -> dict[str, Any]:
    """A generate response: each output by name (one value as itself, several as a list), and the parameters."""
    out: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    for name, array in output_arrays(response).items():
        flat = [bytes(b).decode("utf-8", "replace") for b in array.reshape(-1)] if array.dtype == object else \
            array.reshape(-1).tolist()
        out[name] = flat[0] if name == "text_output" and len(flat) == 1 else flat
    out.update({k: param_value(v) for k, v in response.parameters.items()})
    return out


def error_body(status: Any) -> tuple[int, bytes]:
    """The HTTP status and JSON error body for a refused request (status: its gRPC status code and message)."""
    code, message = status
    return HTTP_STATUS.get(code, 500), json.dumps({"error": message}).encode()


__all__ = ["HEADER_LENGTH", "HTTP_STATUS", "RequestError", "error_body", "generate_request", "generate_response",
           "infer_request", "infer_response", "message_json", "split_body"]
