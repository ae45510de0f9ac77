"""The scheduler through a real server on 127.0.0.1: batched answers equal unbatched ones, generations advance
together, abandoned work stops, request limits are checked before any compute, and idle or unread streams
cost nothing (the faults found under load, each with its test)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_for

from ponder.generation import SamplingParams
from ponder.serve import inference_pb2 as pb
from ponder.serve import inference_pb2_grpc as pb_grpc
from ponder.serve.engine import Engine
from ponder.serve.protocol import output_arrays
from ponder.serve.repository import Repository
from ponder.serve.server import create_server


def ids_request(ids, threshold=None, version="1") -> pb.ModelInferRequest:
    ids = np.asarray(ids, dtype=np.int64)
    request = pb.ModelInferRequest(model_name="tiny", model_version=version)
    request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    request.raw_input_contents.append(ids.astype("<i8").tobytes())
    if threshold is not None:
        request.parameters["act_threshold"].double_param = threshold
    return request


def text_request(text: str, stream: bool = False, **sampling) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny", model_version="1")
    values = {"text_input": ("BYTES", text.encode()), "stream": ("BOOL", stream),
              "sampling_parameters": ("BYTES", json.dumps(sampling).encode())}
    for name, (datatype, value) in values.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1])
        if datatype == "BYTES":
            tensor.contents.bytes_contents.append(value)
        else:
            tensor.contents.bool_contents.append(value)
    return request


@pytest.fixture
def served(model_repository, request):
    """A server of its own (options from the test's ``settings`` marker) and a stub on a real channel."""
    marker = request.node.get_closest_marker("settings")
    options = {"workers": 1, "max_queue": 64, "metrics_port": 0, **(marker.kwargs if marker else {})}
    repo = Repository(model_repository)
    srv, port = create_server(repo, "127.0.0.1:0", **options)
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield srv, pb_grpc.GRPCInferenceServiceStub(channel), channel, port
    channel.close()
    srv.stop()


def stats(srv, version="1"):
    return srv.servicer.repo.find("tiny", version).stats


# -- batching keeps every answer exact --------------------------------------------------------------------------
@pytest.mark.settings(max_queue_delay_us=300_000, max_batch_size=8)
def test_concurrent_requests_share_one_run_and_each_gets_its_unbatched_answer(served, model_repository):
    srv, stub, _, _ = served
    engine = Engine(model_repository / "tiny" / "1" / "model.onnx")
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, size=(rows, 12)) for rows in (1, 2, 1, 3)]
    before = stats(srv).execution_count
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda ids: stub.ModelInfer(ids_request(ids, 0.5), timeout=30), inputs))
    assert stats(srv).execution_count - before == 1  # all four in one run (the delay lets the batch fill)
    for ids, reply in zip(inputs, replies, strict=True):
        alone = engine.infer(ids, 0.5)
        out = output_arrays(reply)
        np.testing.assert_allclose(out["logits"], alone.logits, atol=1e-5)
        np.testing.assert_array_equal(out["token_depth"], alone.token_depth)
        params = reply.parameters
        assert params["layers_executed"].int64_param == alone.layers_executed == alone.token_depth.max()
        assert params["batch_size"].int64_param == 7
        assert params["batch_layers_executed"].int64_param >= alone.layers_executed
    model = stats(srv)
    assert model.inference_count >= 7 and model.execution_count < model.success.count


@pytest.mark.settings(max_queue_delay_us=200_000, max_batch_size=8)
@pytest.mark.parametrize("pads", [True, False], ids=["graph-pads", "older-graph"])
def test_other_lengths_and_thresholds_share_a_run_with_padding(served, model_repository, pads):
    """Rows of other lengths and thresholds share one run through the graph's row_lengths and row_threshold
    (padding never counts); a graph exported before those inputs runs them in groups of equal length and
    threshold. Either way each answer is its unbatched one."""
    srv, stub, _, _ = served
    served_engine = srv.servicer.repo.find("tiny", "1").engine
    assert served_engine.pads
    if not pads:
        served_engine.pads = served_engine.decodes_rows = False  # as an older export: no batching inputs
    engine = Engine(model_repository / "tiny" / "1" / "model.onnx")
    rng = np.random.default_rng(1)
    cases = [(rng.integers(0, 256, size=(1, n)), t) for n, t in ((8, 0.5), (12, 0.5), (8, 0.9), (8, 0.5))]
    before = stats(srv).execution_count
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda c: stub.ModelInfer(ids_request(*c), timeout=30), cases))
    assert stats(srv).execution_count - before == (1 if pads else 3)
    for (ids, threshold), reply in zip(cases, replies, strict=True):
        alone = engine.infer(ids, threshold)
        out = output_arrays(reply)
        np.testing.assert_allclose(out["logits"], alone.logits, atol=1e-5)
        np.testing.assert_array_equal(out["token_depth"], alone.token_depth)
        assert reply.parameters["layers_executed"].int64_param == alone.layers_executed
        assert reply.parameters["mean_token_depth"].double_param == pytest.approx(alone.token_depth.mean())


# -- generation: every stream advances in one decode run per step -------------------------------------------------
@pytest.mark.settings(max_batch_size=8)
def test_concurrent_generations_share_decode_runs_and_give_their_solo_text(served, model_repository):
    srv, stub, _, _ = served
    engine = Engine(model_repository / "tiny" / "1" / "model.onnx")
    prompts = ["The ", "def main", "Once upon a time, ", "x", "Hello, world", "import ", "ab", "  "]
    thresholds = [0.9, 0.5, 0.9, 0.3, 0.9, 0.5, 1.0, 0.9]  # one decode run for all: a threshold per row
    solo = [engine.generate(p, SamplingParams(max_tokens=12), t) for p, t in zip(prompts, thresholds, strict=True)]
    before = stats(srv).execution_count

    def generate(i):
        request = text_request(prompts[i], max_tokens=12)
        request.parameters["act_threshold"].double_param = thresholds[i]
        return stub.ModelInfer(request, timeout=60)

    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(generate, range(len(prompts))))
    for alone, reply in zip(solo, replies, strict=True):
        out = output_arrays(reply)
        assert out["token_ids"].tolist() == alone["token_ids"]
        assert out["token_depth"].tolist() == [s["token_depth"] for s in alone["steps"]]
        layers = sum(s["layers_executed"] for s in alone["steps"])
        assert reply.parameters["total_layers_executed"].int64_param == layers
    runs = stats(srv).execution_count - before
    assert runs < len(prompts) * 12 / 2, f"{runs} runs for {len(prompts) * 12} tokens: the streams did not share"


def test_a_generation_whose_client_left_stops_within_a_step(served):
    """Fault 3: a unary generation computed on after its client's deadline passed."""
    srv, stub, _, _ = served
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(text_request("The ", max_tokens=1024), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    scheduler = srv.schedulers[("tiny", "1")]
    wait_for(lambda: not scheduler.busy, timeout=2, what="the abandoned generation to stop")
    start = time.monotonic()
    stub.ModelInfer(ids_request([[1, 2, 3, 4]]), timeout=1)
    assert time.monotonic() - start < 1


@pytest.mark.settings(max_batch_size=8)
def test_unread_streams_hold_no_compute(served):
    """Fault 2: two streams that asked for long generations and never read held the compute slots, and every
    other client got DEADLINE_EXCEEDED. Now they advance in the shared decode runs (and pause once flow control
    stops their writes, see the next test); the other clients are served within their deadlines."""
    srv, stub, channel, _ = served
    calls = [stub.ModelStreamInfer(iter([text_request("The ", stream=True, max_tokens=1024)])) for _ in range(2)]
    scheduler = srv.schedulers[("tiny", "1")]
    wait_for(lambda: scheduler._active, timeout=20, what="the unread generations to start")
    for _ in range(10):
        reply = stub.ModelInfer(ids_request([[1, 2, 3, 4]]), timeout=1)
        assert reply.parameters["layers_executed"].int64_param >= 1
    for call in calls:
        call.cancel()
    wait_for(lambda: not scheduler.busy, timeout=5, what="the cancelled streams to leave")


def test_a_generation_nobody_reads_is_paused(model_repository):
    """A generation whose tokens are not taken stops being computed after BUFFERED_TOKENS (its client's writes
    are held by flow control); reading again resumes it."""
    import asyncio

    from ponder.serve.scheduler import BUFFERED_TOKENS, BatchSettings, Scheduler

    engine = Engine(model_repository / "tiny" / "1" / "model.onnx")
    runs = []

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            scheduler = Scheduler(engine, BatchSettings(), pool, 1, runs.append)
            stream = scheduler.generate(list(b"The "), SamplingParams(max_tokens=50), 0.9, None)
            await asyncio.sleep(0.5)
            paused_at = len(runs)
            tokens = [t async for t in stream.tokens()]
            scheduler.close(RuntimeError("done"))
            return paused_at, tokens

    paused_at, tokens = asyncio.run(scenario())
    assert paused_at == BUFFERED_TOKENS and len(tokens) == 50 and len(runs) == 50


def test_idle_streams_take_nothing_from_health_or_inference(served):
    """Fault 1: about 75 open streams that send nothing took every RPC thread."""
    srv, stub, channel, port = served
    idle, stop = [], threading.Event()

    def nothing():
        stop.wait(30)
        return
        yield  # a request iterator that never sends

    for _ in range(120):
        idle.append(stub.ModelStreamInfer(nothing()))
    time.sleep(0.3)
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(3):
        start = time.monotonic()
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=2).live
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
        assert stub.ModelInfer(ids_request([[1, 2, 3]]), timeout=2).parameters["layers_executed"].int64_param >= 1
        assert time.monotonic() - start < 1
    stop.set()
    for call in idle:
        call.cancel()


# -- memory is bounded by configuration --------------------------------------------------------------------------
@pytest.mark.settings(max_batch_size=64, max_batch_tokens=1024, max_message_mb=1, max_tokens=64)
def test_requests_beyond_the_limits_are_refused_before_any_compute(served):
    """Fault 4: one request of batch 1024 x 128 computed for 15 s before it was refused."""
    srv, stub, _, _ = served
    runs = stats(srv).execution_count
    cases = [
        (ids_request(np.ones((1024, 16))), grpc.StatusCode.INVALID_ARGUMENT, "--max-batch-size"),
        (ids_request(np.ones((40, 32))), grpc.StatusCode.INVALID_ARGUMENT, "--max-batch-tokens"),
        (text_request("The ", max_tokens=65), grpc.StatusCode.INVALID_ARGUMENT, "--max-tokens"),
    ]
    for request, code, flag in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=5)
        assert info.value.code() == code and flag in info.value.details(), info.value.details()
    # 32 x 32 tokens of 256 float logits (and a depth) = 1.01 MiB: more than a 1 MiB message can carry
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(ids_request(np.ones((32, 32))), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-message-mb" in info.value.details()
    only_depth = ids_request(np.ones((32, 32)))
    only_depth.outputs.add(name="token_depth")
    assert output_arrays(stub.ModelInfer(only_depth, timeout=5))["token_depth"].shape == (32, 32)
    assert stats(srv).execution_count - runs == 1  # only the request within every limit ran


def test_a_message_protobuf_cannot_parse_is_invalid_argument(served):
    """Fault 7: a request that cannot be decoded answered INTERNAL."""
    _, _, channel, _ = served
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff\xff\x0f", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in info.value.details()


# -- Triton's metrics ---------------------------------------------------------------------------------------------
def test_triton_metrics_count_requests_rows_and_runs(served):
    srv, stub, _, _ = served
    stub.ModelInfer(ids_request(np.ones((3, 4))), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(ids_request([[1, 2, 999]]), timeout=5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).read().decode()
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    labels = '{model="tiny",version="1"}'
    assert series[f"nv_inference_request_success{labels}"] == 1
    assert series['nv_inference_request_failure{model="tiny",version="1",reason="OTHER"}'] == 1
    assert series[f"nv_inference_count{labels}"] == 3
    assert series[f"nv_inference_exec_count{labels}"] == 1
    assert series[f"nv_inference_pending_request_count{labels}"] == 0
    for name in ("request_duration_us", "queue_duration_us", "compute_infer_duration_us"):
        assert f"nv_inference_{name}{labels}" in series
    assert series[f"nv_inference_compute_infer_duration_us{labels}"] > 0
    assert "# TYPE nv_inference_count counter" in text and "ponder_requests_total" in text


# -- a model's own batching settings (its config.json) -----------------------------------------------------------
def test_a_models_config_json_sets_its_own_batching_and_a_bad_one_is_reported(model_repository, tmp_path):
    import shutil

    for name, settings in (("small", {"max_batch_size": 2, "dynamic_batching": {"max_queue_delay_microseconds": 500,
                                                                                "max_queue_size": 3}}),
                           ("bad", {"max_batch_size": 0})):
        shutil.copytree(model_repository / "tiny" / "1", tmp_path / name / "1")
        config = json.loads((tmp_path / name / "1" / "config.json").read_text())
        (tmp_path / name / "1" / "config.json").write_text(json.dumps({**config, **settings}))
    srv, port = create_server(tmp_path, "127.0.0.1:0", workers=1)
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="small"), timeout=5).config
            assert config.max_batch_size == 2 and list(config.input[0].dims) == [-1]
            assert config.dynamic_batching.max_queue_delay_microseconds == 500
            assert config.dynamic_batching.default_queue_policy.max_queue_size == 3
            request = ids_request(np.ones((3, 4)))
            request.model_name, request.model_version = "small", ""
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_size 2" in info.value.details()
            assert not stub.ModelReady(pb.ModelReadyRequest(name="bad"), timeout=5).ready
            index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models}
            assert index["bad"].state == "UNAVAILABLE" and "max_batch_size must be" in index["bad"].reason
    finally:
        srv.stop()
