"""The protocol layer: stubs up to date, wire-compatible with tritonclient's, tensor codecs."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import grpc
import numpy as np
import pytest

from ponder.serve import inference_pb2 as pb
from ponder.serve.protocol import RequestError, add_output, decode_tensor, encode_bytes, output_arrays

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_stubs_are_what_make_protos_writes(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) generates the stubs")
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True)
    for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
        fresh, checked_in = (tmp_path / name).read_text(), (ROOT / "serve" / name).read_text()
        assert fresh == checked_in, f"serve/{name} is stale: run `make protos`"
        assert checked_in.startswith("# DO NOT EDIT")


def test_the_newest_tritonclient_is_installed_beside_the_server():
    # the version trap: with protobuf unpinned, pip may satisfy everything with an old tritonclient
    major, minor = (int(x) for x in version("tritonclient").split(".")[:2])
    assert (major, minor) >= (2, 73)
    import google.protobuf

    assert int(google.protobuf.__version__.split(".")[0]) >= 6


def _fields(message):
    return {f.name: (f.number, f.type, f.is_repeated, f.message_type.name if f.message_type else None)
            for f in message.fields}


def _all_messages(file_descriptor):
    out = {}

    def walk(message, prefix=""):
        out[prefix + message.name] = message
        for nested in message.nested_types:
            if not nested.GetOptions().map_entry:
                walk(nested, prefix + message.name + ".")

    for message in file_descriptor.message_types_by_name.values():
        walk(message)
    return out


def test_every_message_matches_tritonclients_field_for_field():
    """Same field numbers, types and labels as the stock client's own stubs: the wire format agrees."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    theirs = {**_all_messages(model_config_pb2.DESCRIPTOR), **_all_messages(service_pb2.DESCRIPTOR)}
    ours = _all_messages(pb.DESCRIPTOR)
    assert len(ours) > 30
    for name, message in ours.items():
        assert name in theirs, name
        their_fields = _fields(theirs[name])
        for field, spec in _fields(message).items():
            assert their_fields.get(field) == spec, f"{name}.{field}: ours {spec}, theirs {their_fields.get(field)}"
    their_service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        theirs_m = their_service.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name) == (theirs_m.input_type.name,
                                                                      theirs_m.output_type.name)
        assert (method.client_streaming, method.server_streaming) == (theirs_m.client_streaming,
                                                                       theirs_m.server_streaming)


def test_ponder_and_tritonclient_share_a_process():
    # both declare package `inference`; ours lives in a private pool, so importing both in either order works
    ours = ("import ponder.serve.inference_pb2 as a, ponder.serve.server; "
            "print(a.ModelInferRequest(model_name='x').model_name)")
    for order in ("import tritonclient.grpc; " + ours, ours + "; import tritonclient.grpc"):
        done = subprocess.run([sys.executable, "-c", order], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "x"


def _tensor(name, datatype, shape):
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


@pytest.mark.parametrize("dtype,datatype", [(np.int64, "INT64"), (np.int32, "INT32"), (np.float32, "FP32"),
                                            (np.float64, "FP64"), (np.uint8, "UINT8"), (np.bool_, "BOOL")])
def test_raw_and_typed_contents_decode_to_the_same_array(dtype, datatype):
    array = (np.arange(12).reshape(3, 4) % 5).astype(dtype)
    raw = decode_tensor(_tensor("x", datatype, [3, 4]), array.astype(array.dtype.newbyteorder("<")).tobytes(), "x")
    typed_tensor = _tensor("x", datatype, [3, 4])
    field = {"INT64": "int64_contents", "INT32": "int_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
             "UINT8": "uint_contents", "BOOL": "bool_contents"}[datatype]
    getattr(typed_tensor.contents, field).extend(array.reshape(-1).tolist())
    typed = decode_tensor(typed_tensor, None, "x")
    assert raw.dtype == typed.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(raw, array)
    np.testing.assert_array_equal(typed, array)


def test_bytes_tensors_round_trip_through_a_response():
    response = pb.ModelInferResponse()
    texts = np.array([b"", b"caf\xc3\xa9", b"x" * 300], dtype=np.object_)
    add_output(response, "text", texts)
    add_output(response, "depth", np.array([[1, 2, 3]], dtype=np.int64))
    assert response.raw_output_contents[0] == encode_bytes(list(texts))
    out = output_arrays(response)
    assert list(out["text"]) == list(texts)
    np.testing.assert_array_equal(out["depth"], [[1, 2, 3]])


@pytest.mark.parametrize("tensor,raw,message", [
    (_tensor("x", "INT64", [2, 3]), b"\0" * 40, "raw contents hold 40 bytes, but shape [2, 3] of INT64 needs 48"),
    (_tensor("x", "INT64", [2, -1]), b"", "negative dimension"),
    (_tensor("x", "COMPLEX", [1]), b"\0" * 8, "datatype 'COMPLEX' is not one of"),
    (_tensor("x", "INT64", [2]), None, "contents.int64_contents holds 0 values, but shape [2] needs 2"),
    (_tensor("x", "BYTES", [1]), b"\x05\0\0\0ab", "runs past the end"),
    (_tensor("x", "BYTES", [1]), b"\x05\0", "inside a 4-byte length prefix"),
    (_tensor("x", "FP16", [1]), None, "FP16 can only be sent as raw contents"),
])
def test_malformed_tensors_are_refused_by_name(tensor, raw, message):
    with pytest.raises(RequestError) as info:
        decode_tensor(tensor, raw, "input 'x'")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.message and "input 'x'" in info.value.message
