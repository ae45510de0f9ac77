"""The server against hostile inputs: a repository with nasty entries, requests with odd versions, long names and
mixed contents, config links out of the repository, and graphs that carry ponder's metadata but not its inputs.
Unit level: a Repository on a tmp folder, decode_tensor and parse on protobuf messages, Engine on a file."""

from __future__ import annotations

import json
import logging
import os
import shutil

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ponder.errors import NotFoundError, PonderError
from ponder.model_repository import parse_version, version_folders
from ponder.serve import inference_pb2 as pb
from ponder.serve.engine import Engine
from ponder.serve.protocol import RequestError, cut, decode_tensor, echo, read_number
from ponder.serve.repository import Repository
from ponder.serve.requests import parse

METADATA_LIMIT = 8192  # gRPC's default limit on metadata, where a status message travels


def _version(root, name="good", version="1", source=None):
    """A copy of the exported tiny model (model.onnx, decode.onnx, config.json) as ROOT/NAME/VERSION."""
    folder = root / name / version
    shutil.copytree(source, folder)
    return folder


@pytest.fixture(scope="module")
def tiny(model_repository):
    return model_repository / "tiny" / "1"


# -- 1. a bad entry never stops the server from starting ------------------------------------------------------------

@pytest.fixture(scope="module")
def nasty(tmp_path_factory, tiny):
    """A repository holding one good model and every kind of entry that cannot be read."""
    base = tmp_path_factory.mktemp("nasty")
    root = base / "models"
    _version(root, source=tiny)
    _version(root, "good", "\u00b2", tiny)  # '²'.isdigit() is True, int('²') fails
    _version(root, "good", "1" * 200, tiny)  # as many digits as a file name holds
    (root / "good" / "3").write_text("a file where a version folder belongs")
    (root / "loop" / "1").mkdir(parents=True)
    (root / "loop" / "1" / "model.onnx").symlink_to(root / "loop" / "1" / "model.onnx")  # a link loop
    (root / "folder-model" / "1" / "model.onnx").mkdir(parents=True)  # a folder where the model file belongs
    (root / "dangling").symlink_to(base / "nowhere", target_is_directory=True)
    (root / "circle").symlink_to(root / "circle")
    (root / "README").write_text("a file where a model folder belongs")
    (root / "only-unicode" / "\u0661").mkdir(parents=True)  # an Arabic-Indic one
    return root


@pytest.fixture(scope="module")
def nasty_repo(nasty):
    logger = logging.getLogger("ponder.serve")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        repo = Repository(nasty)
    finally:
        logger.removeHandler(handler)
    return repo, [r.getMessage() for r in records]


def test_a_repository_with_nasty_entries_starts_and_serves_the_good_model(nasty_repo):
    repo, _ = nasty_repo
    assert repo.find("good", "1").ready
    assert repo.find("good", "1" * 200).ready  # a long number is still a version
    assert sorted(repo.models["good"]) == sorted(["1", "1" * 200])


def test_an_unreadable_model_file_is_an_unavailable_version_with_its_reason(nasty_repo):
    repo, _ = nasty_repo
    loop = repo.models["loop"]["1"]
    assert not loop.ready and "loop" in loop.error
    folder = repo.models["folder-model"]["1"]
    assert not folder.ready and "does not exist" in folder.error


@pytest.mark.parametrize(("entry", "why"), [
    ("good/\u00b2", "ASCII digits"), ("good/3", "not one"), ("dangling", "link to nothing"),
    ("circle", "link to nothing"), ("only-unicode/\u0661", "ASCII digits"),
])
def test_every_skipped_entry_is_reported(nasty_repo, nasty, entry, why):
    repo, messages = nasty_repo
    said = [m for m in messages if repr(str(nasty / entry)) in m]
    assert said and why in said[0], messages
    assert entry.split("/")[0] not in ("dangling", "circle") or entry not in repo.models


def test_version_folders_never_raise(tmp_path):
    (tmp_path / "m").write_text("a file, not a folder")
    assert version_folders(tmp_path / "m") == [] and version_folders(tmp_path / "gone") == []
    assert parse_version("1" * 5000) is None  # more digits than int() reads


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_an_unreadable_model_is_unavailable_and_the_others_serve(tmp_path, tiny):
    _version(tmp_path, source=tiny)
    secret = _version(tmp_path, "secret", "1", tiny)
    (secret / "model.onnx").chmod(0)
    (tmp_path / "closed").mkdir()
    (tmp_path / "closed").chmod(0)
    try:
        repo = Repository(tmp_path)
        assert repo.find("good").ready and not repo.models["secret"]["1"].ready
    finally:
        (tmp_path / "closed").chmod(0o755)


# -- 2. request versions of Unicode digits or thousands of digits ---------------------------------------------------

@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("plain")
    _version(root, source=tiny)
    return Repository(root)


@pytest.mark.parametrize("version", ["\u00b2", "\u2460", "\u0661", "\u0663\u0662", "\uff11", "1" * 5000, "9" * 30])
def test_a_version_that_is_no_ascii_number_is_not_found_briefly(plain_repo, version):
    with pytest.raises(NotFoundError) as info:
        plain_repo.find("good", version)
    message = str(info.value)
    assert message.startswith("model_version ") and "does not exist" in message and len(message) < 600
    assert echo(version) in message


# -- 3. error messages that echo a client's value are cut -----------------------------------------------------------

def test_echo_cuts_long_values_and_keeps_short_ones():
    assert echo("tiny") == "'tiny'" and echo(b"ab") == "b'ab'" and echo([1, 2]) == "[1, 2]"
    assert echo("x" * 20000) == f"{'x' * 64!r}… (20000 chars)"
    assert echo(b"y" * 100, 10) == f"{b'y' * 10!r}… (100 bytes)"
    assert echo(["a" * 100] * 20).endswith("… (20 in all)]") and len(echo(["a" * 100] * 20)) < 1000
    assert cut("z" * 10000, 100) == "z" * 100 + "… (10000 chars)" and cut("short") == "short"


@pytest.mark.parametrize("length", [10_000, 20_000])
def test_a_long_model_name_is_not_found_with_a_short_message(plain_repo, length):
    with pytest.raises(NotFoundError) as info:
        plain_repo.find("m" * length)
    message = str(info.value)
    assert f"({length} chars)" in message and len(message) < 1000


LONG = "n" * 20000


def _unknown_input(r):
    r.inputs.add(name=LONG, datatype="INT64", shape=[1, 2])


def _long_datatype(r):
    r.inputs.add(name="input_ids", datatype=LONG, shape=[1, 2])


def _unknown_generation_input(r):
    r.inputs.add(name=LONG, datatype="BOOL", shape=[1])
    r.inputs.add(name="text_input", datatype="BYTES", shape=[1])


def _unknown_output(r):
    r.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([1, 2])
    r.outputs.add(name=LONG)


def _many_duplicates(r):
    for i in range(20):
        r.inputs.add(name=f"{i}{LONG}")
        r.inputs.add(name=f"{i}{LONG}")


def _long_threshold(r):
    r.parameters["act_threshold"].string_param = LONG


@pytest.mark.parametrize("build", [_unknown_input, _long_datatype, _unknown_generation_input, _unknown_output,
                                   _many_duplicates, _long_threshold])
def test_request_messages_that_echo_client_strings_stay_short(tiny, build):
    request = pb.ModelInferRequest(model_name="tiny")
    build(request)
    with pytest.raises(RequestError) as info:
        parse(request, Engine(tiny / "model.onnx"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "(20000 chars)" in info.value.message or "20 in all" in info.value.message or \
        "got string_param" in info.value.message
    assert len(info.value.message.encode()) < 2000, info.value.message[:300]


def test_sampling_errors_that_repeat_a_key_are_cut(tiny):
    request = pb.ModelInferRequest(model_name="tiny")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"hello")
    sampling = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    sampling.contents.bytes_contents.append(json.dumps({LONG: 1}).encode())
    with pytest.raises(RequestError) as info:
        parse(request, Engine(tiny / "model.onnx"))
    assert "sampling_parameters" in info.value.message and len(info.value.message) < 1000


def test_tensor_and_parameter_messages_cut_client_strings():
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=LONG, shape=[1])
    with pytest.raises(RequestError) as info:
        decode_tensor(tensor, None, "input 'x'")
    assert "(20000 chars)" in info.value.message and len(info.value.message) < 1000
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT64", shape=[1] * 5000)
    with pytest.raises(RequestError) as info:
        decode_tensor(tensor, b"", "input 'x'")
    assert "(5000 in all)" in info.value.message and len(info.value.message) < 1000
    params = pb.ModelInferRequest().parameters
    params["act_threshold"].string_param = LONG
    with pytest.raises(RequestError) as info:
        read_number(params, "act_threshold")
    assert "(20000 chars)" in info.value.message and len(info.value.message) < 1000


# -- 4. raw and typed contents for one input ------------------------------------------------------------------------

@pytest.mark.parametrize(("datatype", "typed", "values", "raw"), [
    ("INT64", "int64_contents", [1, 2], np.array([1, 2], "<i8").tobytes()),
    ("INT32", "int_contents", [1, 2], np.array([1, 2], "<i4").tobytes()),
    ("FP32", "fp32_contents", [1.0, 2.0], np.array([1, 2], "<f4").tobytes()),
    ("BOOL", "bool_contents", [True, False], b"\x01\x00"),
    ("BYTES", "bytes_contents", [b"a", b"b"], b"\x01\0\0\0a\x01\0\0\0b"),
    ("FP16", "fp32_contents", [1.0, 2.0], np.array([1, 2], "<f2").tobytes()),  # FP16 has no typed field
    ("INT64", "fp64_contents", [1.0, 2.0], np.array([1, 2], "<i8").tobytes()),  # another type's field
])
def test_raw_and_typed_contents_together_are_refused(datatype, typed, values, raw):
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[2])
    getattr(tensor.contents, typed).extend(values)
    with pytest.raises(RequestError) as info:
        decode_tensor(tensor, raw, "input 'x'")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in info.value.message and "both typed contents" in info.value.message
    assert typed in info.value.message


def test_typed_contents_in_another_types_field_are_refused():
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT64", shape=[2])
    tensor.contents.int64_contents.extend([1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(RequestError, match="INT64 travels in contents.int64_contents, not in .*fp32_contents"):
        decode_tensor(tensor, None, "input 'x'")
    ok = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT64", shape=[2])
    assert decode_tensor(ok, np.array([3, 4], "<i8").tobytes(), "input 'x'").tolist() == [3, 4]  # raw alone


# -- 5. a config.json (or decode graph) that links out of the repository --------------------------------------------

@pytest.mark.parametrize("linked", ["config.json", "decode.onnx"])
def test_a_file_linking_out_of_the_repository_makes_the_version_unavailable(tmp_path, tiny, linked):
    root = tmp_path / "models"
    folder = _version(root, source=tiny)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(folder / linked, elsewhere / linked)
    (folder / linked).symlink_to(elsewhere / linked)
    version = Repository(root).models["good"]["1"]
    assert not version.ready
    assert linked in version.error and "points outside the repository" in version.error
    Engine(folder / "model.onnx")  # outside a repository (no root), a model's files are its own business


def test_a_config_linked_within_the_repository_is_read(tmp_path, tiny):
    root = tmp_path / "models"
    folder = _version(root, source=tiny)
    (root / "shared").mkdir()
    (root / "shared" / "config.json").write_text(json.dumps({"tokenizer": {"kind": "byte"}, "marker": 1}))
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(root / "shared" / "config.json")
    assert Repository(root).find("good").engine.config["marker"] == 1


@pytest.mark.parametrize(("content", "reason"), [(b"[1, 2]", "not an object"), (b"\xff\xfe{}", "cannot be read")])
def test_a_config_that_is_no_json_object_makes_the_version_unavailable(tmp_path, tiny, content, reason):
    folder = _version(tmp_path, source=tiny)
    (folder / "config.json").write_bytes(content)
    version = Repository(tmp_path).models["good"]["1"]
    assert not version.ready and reason in version.error


# -- 6. a graph with ponder's metadata but not ponder's signature ---------------------------------------------------

def _with_metadata(graph, source):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.extend(onnx.load(str(source), load_external_data=False).metadata_props)
    return model


def test_an_unrelated_graph_with_ponder_metadata_is_unavailable(tmp_path, tiny):
    folder = _version(tmp_path, source=tiny)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    onnx.save(_with_metadata(graph, tiny / "model.onnx"), str(folder / "model.onnx"))
    with pytest.raises(PonderError) as info:
        Engine(folder / "model.onnx")
    message = str(info.value)
    assert "needs the input 'x'" in message and "has no input 'input_ids'" in message
    assert "'logits', 'layers_executed', 'token_depth'" in message
    version = Repository(tmp_path).models["good"]["1"]
    assert not version.ready and "is not a graph ponder serves" in version.error


def test_input_ids_of_the_wrong_type_is_refused(tmp_path, tiny):
    model = onnx.load(str(tiny / "model.onnx"))
    ids = next(i for i in model.graph.input if i.name == "input_ids")
    ids.type.tensor_type.elem_type = TensorProto.INT32
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(PonderError, match=r"declares 'input_ids' a tensor\(int32\) of rank 2, not tensor\(int64\)"):
        Engine(tmp_path / "m.onnx")


def test_extra_inputs_with_defaults_load_and_extra_required_inputs_do_not(tmp_path, tiny):
    model = onnx.load(str(tiny / "model.onnx"))
    model.graph.input.append(helper.make_tensor_value_info("future_input", TensorProto.INT64, [1]))
    model.graph.initializer.append(helper.make_tensor("future_input", TensorProto.INT64, [1], [0]))
    (tmp_path / "a").mkdir()
    onnx.save(model, str(tmp_path / "a" / "m.onnx"))
    assert Engine(tmp_path / "a" / "m.onnx").infer(np.zeros((1, 4), np.int64)).logits.shape == (1, 4, 256)
    del model.graph.initializer[-1]
    (tmp_path / "b").mkdir()
    onnx.save(model, str(tmp_path / "b" / "m.onnx"))
    with pytest.raises(PonderError, match="needs the input 'future_input', which the server does not feed"):
        Engine(tmp_path / "b" / "m.onnx")


def test_a_decode_graph_without_its_inputs_is_refused(tmp_path, tiny):
    folder = _version(tmp_path, source=tiny)
    model = onnx.load(str(folder / "decode.onnx"))
    next(i for i in model.graph.input if i.name == "attention_mask").name = "mask"  # fed to the old name
    model.graph.node.insert(0, helper.make_node("Identity", ["mask"], ["attention_mask"]))
    onnx.save(model, str(folder / "decode.onnx"))
    version = Repository(tmp_path).models["good"]["1"]
    assert not version.ready
    assert "the decode graph" in version.error and "has no input 'attention_mask'" in version.error
