"""The gRPC server on 127.0.0.1 with real channels: stock tritonclient, our client, health, reflection, metrics,
and every bad input answered with its exact status code and a message naming the field."""

from __future__ import annotations

import json
import math
import queue
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from helpers import run_ponder

from ponder.generation import SamplingParams
from ponder.serve import inference_pb2 as pb
from ponder.serve import inference_pb2_grpc as pb_grpc
from ponder.serve.client import Client, ServerError
from ponder.serve.engine import Engine
from ponder.serve.server import SERVICE, create_server

PROMPT = b"The return statement"


@pytest.fixture(scope="module")
def server(model_repository):
    srv, port = create_server(model_repository, "127.0.0.1:0", metrics_port=0, workers=2, max_queue=8)
    srv.start()
    yield srv, f"127.0.0.1:{port}"
    srv.drain(grace=2)


@pytest.fixture(scope="module")
def engine(model_repository):
    return Engine(model_repository / "tiny" / "2" / "model.onnx")


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server[1])
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def ids_of(text: bytes = PROMPT) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64)[None]


def triton_ids(ids: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    return tensor


def triton_text(text: bytes, sampling: dict | None = None, stream: bool | None = None,
                exclude_input: bool | None = None) -> list[triton.InferInput]:
    """A generation request's inputs as Triton's LLM clients send them."""
    inputs = []
    for name, datatype, value in (("text_input", "BYTES", text),
                                  ("sampling_parameters", "BYTES", None if sampling is None else json.dumps(sampling)),
                                  ("stream", "BOOL", stream), ("exclude_input_in_output", "BOOL", exclude_input)):
        if value is None:
            continue
        tensor = triton.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else np.bool_))
        inputs.append(tensor)
    return inputs


# -- stock tritonclient -----------------------------------------------------------------------------------------
def test_tritonclient_health_metadata_and_config(server):
    client = triton.InferenceServerClient(server[1])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("broken")
    meta = client.get_model_metadata("tiny")
    assert meta.name == "tiny" and list(meta.versions) == ["1", "2"] and meta.platform == "onnxruntime_onnx"
    # One request shape that works when a generic client sends all of it (tests/test_serve_clients.py)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input_ids", "INT64", [-1, -1])]
    assert [t.name for t in meta.outputs] == ["logits", "token_depth"]
    config = client.get_model_config("tiny").config
    assert config.name == "tiny" and config.backend == "onnxruntime"
    assert config.parameters["n_layers"].string_value == "3"
    assert config.parameters["act_threshold"].string_value == "0.9"
    assert config.parameters["precision"].string_value == "fp32"  # ponder export --precision
    server_meta = client.get_server_metadata()
    assert server_meta.name == "ponder" and "statistics" in server_meta.extensions


def test_tritonclient_infer_matches_onnx_runtime_in_process(server, engine):
    client = triton.InferenceServerClient(server[1])
    ids = np.concatenate([ids_of(), ids_of(b"def f(x): return x+1")[:, :20]])
    for threshold in (0.3, 0.9, 1.0):
        result = client.infer("tiny", [triton_ids(ids)], parameters={"act_threshold": threshold})
        local = engine.infer(ids, threshold)
        np.testing.assert_allclose(result.as_numpy("logits"), local.logits, atol=1e-5)
        np.testing.assert_array_equal(result.as_numpy("token_depth"), local.token_depth)
        params = result.get_response().parameters
        assert params["layers_executed"].int64_param == local.layers_executed
        assert math.isclose(params["mean_token_depth"].double_param, local.mean_token_depth)
        for key in ("compute_ms", "queue_ms", "server_ms"):
            assert params[key].double_param >= 0
        assert params["server_ms"].double_param >= params["compute_ms"].double_param
        if threshold == 1.0:
            assert params["layers_executed"].int64_param == 3
    low = client.infer("tiny", [triton_ids(ids)], parameters={"act_threshold": 0.3}).get_response()
    assert low.parameters["layers_executed"].int64_param < 3  # the graph really stopped early
    default = client.infer("tiny", [triton_ids(ids)]).get_response()  # no threshold: the model's own (0.9)
    assert default.parameters["layers_executed"].int64_param == engine.infer(ids, 0.9).layers_executed


def test_typed_contents_through_tritonclients_own_stub(server, engine):
    """tritonclient's InferInput always sends raw bytes; its generated stub sends typed contents."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    ids = ids_of()
    request = service_pb2.ModelInferRequest(model_name="tiny", model_version="1", id="req-7")
    tensor = request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    tensor.contents.int64_contents.extend(ids.reshape(-1).tolist())
    request.outputs.add(name="token_depth")
    request.parameters["act_threshold"].double_param = 0.5
    with grpc.insecure_channel(server[1]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "req-7")
    assert [o.name for o in response.outputs] == ["token_depth"]  # only what was asked for
    depth = np.frombuffer(response.raw_output_contents[0], dtype="<i8").reshape(list(response.outputs[0].shape))
    np.testing.assert_array_equal(depth, engine.infer(ids, 0.5).token_depth)


def test_tritonclient_generates_text_unary_and_streamed(server, engine):
    from ponder.generation import SamplingParams

    client = triton.InferenceServerClient(server[1])
    expected = engine.generate(PROMPT.decode(), SamplingParams(max_tokens=6), 0.5)
    new_text = bytes(expected["token_ids"])
    result = client.infer("tiny", triton_text(PROMPT, {"max_tokens": 6}), parameters={"act_threshold": 0.5})
    assert result.as_numpy("token_ids").tolist() == expected["token_ids"]
    assert result.as_numpy("text_output")[0] == PROMPT + new_text  # the prompt first, as vLLM's backend does
    depths = [s["token_depth"] for s in expected["steps"]]
    assert result.as_numpy("token_depth").tolist() == depths
    params = result.get_response().parameters
    assert params["finish_reason"].string_param == "length" and params["tokens_generated"].int64_param == 6
    assert params["total_layers_executed"].int64_param == sum(s["layers_executed"] for s in expected["steps"])
    excluded = client.infer("tiny", triton_text(PROMPT, {"max_tokens": 6}, exclude_input=True),
                            parameters={"act_threshold": 0.5})
    assert excluded.as_numpy("text_output")[0] == new_text

    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:  # what Triton's LLM clients send: text_input, stream, sampling_parameters (numbers as strings)
        client.async_stream_infer("tiny", triton_text(PROMPT, {"max_tokens": "6", "temperature": "0"}, stream=True),
                                  parameters={"act_threshold": 0.5})
        got = [responses.get(timeout=30) for _ in range(6)]
    finally:
        client.stop_stream()
    assert all(error is None for _, error in got)
    params = [r.get_response().parameters for r, _ in got]
    assert [int(r.as_numpy("token_ids")[0]) for r, _ in got] == expected["token_ids"]
    assert b"".join(r.as_numpy("text_output")[0] for r, _ in got) == new_text  # the new text only
    assert [int(r.as_numpy("token_depth")[0]) for r, _ in got] == depths
    assert [p["layers_executed"].int64_param for p in params] == [s["layers_executed"] for s in expected["steps"]]
    assert [p["token_index"].int64_param for p in params] == list(range(6))
    assert [p["prefill"].bool_param for p in params] == [True] + [False] * 5
    assert [p["triton_final_response"].bool_param for p in params] == [False] * 5 + [True]
    assert params[-1]["finish_reason"].string_param == "length"


def test_generation_on_a_model_without_its_decode_graph_says_how_to_export_it(tmp_path, model_repository):
    import shutil

    shutil.copytree(model_repository / "tiny" / "1", tmp_path / "old" / "1")
    (tmp_path / "old" / "1" / "decode.onnx").unlink()  # as exported with --no-decode
    srv, port = create_server(tmp_path, "127.0.0.1:0", workers=1)
    srv.start()
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        with pytest.raises(Exception) as refused:
            client.infer("old", triton_text(PROMPT, {"max_tokens": 2}))
        assert "INVALID_ARGUMENT" in str(refused.value) and "without its decode graph" in str(refused.value)
        assert "ponder export" in str(refused.value)
        assert client.infer("old", [triton_ids(ids_of())]).as_numpy("logits").shape[:2] == (1, len(PROMPT))
        config = client.get_model_config("old").config
        assert config.parameters["generation"].string_value == "none: exported without its decode graph"
    finally:
        srv.drain(grace=1)


def test_sampling_is_seeded_and_stop_strings_end_generation_over_the_server(server, engine):
    from ponder.generation import SamplingParams

    client = triton.InferenceServerClient(server[1])
    sampled = {"max_tokens": 12, "temperature": 1.2, "top_p": 0.9, "seed": 3}
    first, again = (client.infer("tiny", triton_text(PROMPT, sampled)).as_numpy("token_ids").tolist()
                    for _ in range(2))
    in_process = engine.generate(PROMPT.decode(), SamplingParams.from_json(sampled))["token_ids"]
    assert first == again == in_process  # the same seed, the same text
    other = client.infer("tiny", triton_text(PROMPT, {**sampled, "seed": 4})).as_numpy("token_ids").tolist()
    assert other != first
    greedy = engine.generate(PROMPT.decode(), SamplingParams(max_tokens=12))
    text = bytes(greedy["token_ids"])
    ascii_bytes = [b for b in text[2:] if b < 128]  # a stop string is text: pick one the model writes
    assert ascii_bytes, text
    stop = chr(ascii_bytes[0])
    result = client.infer("tiny", triton_text(PROMPT, {"max_tokens": 12, "stop": [stop]}, exclude_input=True))
    assert result.as_numpy("text_output")[0] == text.split(stop.encode())[0]
    assert result.get_response().parameters["finish_reason"].string_param == "stop"
    top1 = client.infer("tiny", triton_text(PROMPT, {"max_tokens": 12, "temperature": 5, "top_k": 1, "seed": 9},
                                            exclude_input=True))
    assert top1.as_numpy("token_ids").tolist() == greedy["token_ids"]


def test_tritonclient_statistics_count_requests(server):
    client = triton.InferenceServerClient(server[1])
    before = client.get_inference_statistics("tiny", "2").model_stats[0]
    client.infer("tiny", [triton_ids(np.concatenate([ids_of()] * 3))])
    after = client.get_inference_statistics("tiny", "2").model_stats[0]
    assert after.inference_count == before.inference_count + 3  # batch items
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    every = client.get_inference_statistics().model_stats
    assert {(s.name, s.version) for s in every} == {("tiny", "1"), ("tiny", "2"), ("broken", "1")}


# -- our client ---------------------------------------------------------------------------------------------------
def test_our_client_raw_and_typed_agree_and_streaming_matches_unary(server, engine):
    with Client(server[1]) as client:
        assert client.live() and client.ready() and client.default_model() == "tiny"
        raw = client.infer("tiny", ids_of(), threshold=0.5)
        typed = client.infer("tiny", ids_of(), threshold=0.5, typed=True)
        np.testing.assert_array_equal(raw.outputs["logits"], typed.outputs["logits"])
        assert raw.layers_executed == typed.layers_executed == engine.infer(ids_of(), 0.5).layers_executed
        sampling = SamplingParams(max_tokens=5)
        once = client.generate_once("tiny", "def ", sampling=sampling, threshold=0.7)
        streamed = list(client.generate("tiny", "def ", sampling=sampling, threshold=0.7))
    assert [int(r.outputs["token_ids"][0]) for r in streamed] == once.outputs["token_ids"].tolist()
    assert [int(r.outputs["token_depth"][0]) for r in streamed] == once.outputs["token_depth"].tolist()


def test_repository_index_reports_the_broken_model_and_skips_the_outside_link(server):
    with Client(server[1]) as client:
        index = {(m.name, m.version): (m.state, m.reason) for m in client.index()}
    assert index[("tiny", "1")] == index[("tiny", "2")] == ("READY", "")
    state, reason = index[("broken", "1")]
    assert state == "UNAVAILABLE" and "ONNX" in reason
    assert not any(name == "outside" for name, _ in index)


def test_health_service_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        assert any("reflection" in s for s in services)
        described = database.FindFileContainingSymbol("inference.ModelInferRequest")
        assert "ModelInferRequest" in [m.name for m in described.message_type]


def test_metrics_count_requests_latency_layers_and_queue(server):
    with Client(server[1]) as client:
        client.infer("tiny", ids_of(), threshold=1.0)
        with pytest.raises(ServerError):
            client.infer("nope", ids_of())
    text = urllib.request.urlopen(f"http://127.0.0.1:{server[0].metrics_port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    assert samples['ponder_requests_total{model="tiny",status="OK"}'] >= 1
    assert samples['ponder_requests_total{model="(unknown)",status="NOT_FOUND"}'] >= 1
    assert samples['ponder_request_latency_seconds_count{model="tiny"}'] >= 1
    assert samples['ponder_layers_executed_bucket{le="3.0",model="tiny"}'] >= 1
    assert samples['ponder_layers_executed_bucket{le="2.0",model="tiny"}'] < samples[
        'ponder_layers_executed_count{model="tiny"}']  # the threshold-1.0 run used all 3 layers
    assert "ponder_queue_depth 0.0" in text


# -- bad input ----------------------------------------------------------------------------------------------------
def request_with(ids=None, *, datatype="INT64", shape=None, raw=None, name="input_ids", model="tiny",
                 version="", params=None, outputs=()) -> pb.ModelInferRequest:
    ids = ids_of() if ids is None else np.asarray(ids)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=list(ids.shape) if shape is None else shape)
    request.raw_input_contents.append(ids.tobytes() if raw is None else raw)
    for key, value in (params or {}).items():
        param = request.parameters[key]
        if isinstance(value, str):
            param.string_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.int64_param = value
    for output in outputs:
        request.outputs.add(name=output)
    return request


def generation(text: bytes = b"def ", sampling: dict | bytes | None = None, stream_as: bytes | None = None,
               with_ids: bool = False) -> pb.ModelInferRequest:
    """A generation request with typed contents (text_input, and sampling_parameters, stream, input_ids if given)."""
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(text)
    if sampling is not None:
        data = sampling if isinstance(sampling, bytes) else json.dumps(sampling).encode()
        request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            data)
    if stream_as is not None:
        request.inputs.add(name="stream", datatype="BYTES", shape=[1]).contents.bytes_contents.append(stream_as)
    if with_ids:
        request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([1, 2])
    return request


NOT_FOUND, INVALID, UNAVAILABLE = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                   grpc.StatusCode.UNAVAILABLE)
BAD_REQUESTS = {
    "unknown model": (request_with(model="nope"), NOT_FOUND, "model_name 'nope' is not in the repository"),
    "path in the name": (request_with(model="../tiny"), NOT_FOUND, "model_name '../tiny'"),
    "absolute path": (request_with(model="/etc/passwd"), NOT_FOUND, "model_name '/etc/passwd'"),
    "link outside": (request_with(model="outside"), NOT_FOUND, "model_name 'outside'"),
    "unknown version": (request_with(version="7"), NOT_FOUND, "model_version '7' of model 'tiny' does not exist"),
    "broken model": (request_with(model="broken"), UNAVAILABLE, "failed to load"),
    "wrong dtype": (request_with(ids_of().astype(np.float32), datatype="FP32"), INVALID,
                    "input 'input_ids': datatype is 'FP32', expected 'INT64'"),
    "wrong rank": (request_with(ids_of()[0]), INVALID, "input 'input_ids': shape [20] has rank 1, expected rank 2"),
    "empty sequence": (request_with(np.zeros((1, 0), np.int64)), INVALID,
                       "input 'input_ids': sequence length 0 is outside [2, 32]"),
    "too long": (request_with(np.zeros((1, 33), np.int64)), INVALID,
                 "input 'input_ids': sequence length 33 is outside [2, 32]"),
    "id above vocab": (request_with([[1, 2, 256]]), INVALID, "input 'input_ids': token ids must be in [0, 256)"),
    "negative id": (request_with([[1, -1, 3]]), INVALID, "got values in [-1, 3]"),
    "raw size": (request_with(raw=b"\0" * 12, shape=[1, 2]), INVALID,
                 "input 'input_ids': raw contents hold 12 bytes, but shape [1, 2] of INT64 needs 16"),
    "threshold nan": (request_with(params={"act_threshold": float("nan")}), INVALID,
                      "parameter 'act_threshold' = nan is outside (0, 1]"),
    "threshold zero": (request_with(params={"act_threshold": 0.0}), INVALID, "'act_threshold' = 0.0 is outside"),
    "threshold above one": (request_with(params={"act_threshold": 1.5}), INVALID, "'act_threshold' = 1.5"),
    "threshold as text": (request_with(params={"act_threshold": "high"}), INVALID,
                          "parameter 'act_threshold' must be a number"),
    "unknown input": (request_with(name="tokens"), INVALID, "inputs: expected input_ids (INT64 [batch, seq]) to "
                      "score, or text_input (BYTES [1]) to generate; got ['tokens']"),
    "unknown output": (request_with(outputs=["hidden"]), INVALID, "outputs: 'hidden' is not an output"),
    "old text input": (request_with(name="text", datatype="BYTES", shape=[1], raw=b"\2\0\0\0hi"), INVALID,
                       "input 'text' is now 'text_input'"),
    "text as int64": (request_with(name="text_input"), INVALID,
                      "input 'text_input': datatype is 'INT64', expected 'BYTES'"),
    "empty text": (generation(b""), INVALID, "the prompt encodes to no tokens"),
    "prompt too long": (generation(b"x" * 33), INVALID, "the prompt is 33 tokens long; the model takes at most 32"),
    "not UTF-8": (generation(b"caf\xe9"), INVALID, "input 'text_input' is not valid UTF-8 (byte 3"),
    "zero tokens": (generation(sampling={"max_tokens": 0}), INVALID,
                    "input 'sampling_parameters': max_tokens = 0 is outside [1, 1024]"),
    "negative tokens": (generation(sampling={"max_tokens": -2}), INVALID, "max_tokens = -2 is outside"),
    "too many tokens": (generation(sampling={"max_tokens": 1025}), INVALID, "max_tokens = 1025 is outside"),
    "negative temperature": (generation(sampling={"temperature": -0.5}), INVALID, "temperature = -0.5 must be"),
    "nan temperature": (generation(sampling={"temperature": "NaN"}), INVALID, "temperature = nan must be"),
    "top_p zero": (generation(sampling={"top_p": 0}), INVALID, "top_p = 0.0 is outside (0, 1]"),
    "top_p above one": (generation(sampling={"top_p": 1.01}), INVALID, "top_p = 1.01 is outside (0, 1]"),
    "negative top_k": (generation(sampling={"top_k": -1}), INVALID, "top_k = -1 must be >= 0"),
    "unknown sampling key": (generation(sampling={"beam_width": 4}), INVALID, "unknown key(s) 'beam_width'"),
    "sampling not an object": (generation(sampling=b"[1, 2]"), INVALID, "must be a JSON object, got list"),
    "sampling not JSON": (generation(sampling=b"{max_tokens"), INVALID, "sampling_parameters is not valid JSON"),
    "stream as bytes": (generation(stream_as=b"yes"), INVALID, "input 'stream': datatype is 'BYTES', expected 'BOOL'"),
    "both request shapes": (generation(with_ids=True), INVALID, "not both"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_status_and_names_the_field(server, stub, case):
    request, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == code
    assert message in info.value.details()
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # and the server is fine


def test_typed_contents_with_the_wrong_count_and_two_inputs(stub):
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend([1, 2, 3])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == INVALID
    assert "input 'input_ids': contents.int64_contents holds 3 values, but shape [1, 4] needs 4" in info.value.details()
    request.inputs.add(name="position_ids", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend([1, 2, 3, 4])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert "inputs: input_ids goes alone, got ['input_ids', 'position_ids']" in info.value.details()


def test_a_bad_request_in_a_stream_answers_with_an_error_and_the_stream_goes_on(stub):
    good = request_with(params={"act_threshold": 1.0})
    answers = list(stub.ModelStreamInfer(iter([request_with(model="nope"), good]), timeout=30))
    assert "model_name 'nope'" in answers[0].error_message
    assert answers[1].infer_response.parameters["layers_executed"].int64_param == 3


def test_metadata_and_config_of_unknown_models(stub):
    for call, request in ((stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
                          (stub.ModelConfig, pb.ModelConfigRequest(name="tiny", version="9")),
                          (stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope")),
                          (stub.ModelReady, pb.ModelReadyRequest(name="../tiny"))):
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == NOT_FOUND
    assert not stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready


# -- the command line ---------------------------------------------------------------------------------------------
def test_ponder_client_commands(server):
    address = ["--address", server[1]]
    health = json.loads(run_ponder("client", *address, "health", "--json").stdout)
    assert health["live"] and health["ready"]
    assert {"name": "broken", "version": "1", "state": "UNAVAILABLE"}.items() <= health["models"][0].items()
    meta = run_ponder("client", *address, "metadata", "--model", "tiny").stdout
    assert "input  input_ids: INT64 [-1, -1]" in meta
    out = run_ponder("client", *address, "infer", "--model", "tiny", "--text", "The return", "-t", "1.0").stdout
    assert "layers executed 3" in out and "round trip" in out
    typed = json.loads(run_ponder("client", *address, "infer", "--ids", "1,2,3", "--typed", "--json").stdout)
    assert typed["model"] == "tiny" and len(typed["token_depth"][0]) == 3
    gen = run_ponder("client", *address, "generate", "def ", "--max-tokens", "4", "-t", "0.5").stdout
    assert gen.count("arrived after") == 4 and "4 tokens (length); depth per token" in gen
    bad = run_ponder("client", *address, "generate", "def ", "--top-p", "2", check=False)
    assert bad.returncode == 2 and "--top-p = 2.0 is outside (0, 1]" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_ponder("client", *address, "infer", "--model", "nope", "--ids", "1 2", check=False)
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def test_ponder_serve_refuses_bad_flags_in_one_line(tmp_path, model_repository):
    cases = [(["--repository", str(tmp_path / "none")], "is not a folder"),
             (["--repository", str(model_repository), "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
             (["--repository", str(model_repository), "--address", "localhost"], "--address must be HOST:PORT"),
             (["--repository", str(model_repository), "--workers", "0"], "--workers must be >= 1"),
             (["--repository", str(model_repository), "--address", "127.0.0.1:0", "--metrics-port", "-1",
               "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")], "--tls-key")]
    for args, message in cases:
        proc = run_ponder("serve", *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
