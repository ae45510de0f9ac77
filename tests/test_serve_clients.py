"""Clients ponder did not write, as they behave by default: tritonclient with no deadline, a perf_analyzer-shaped
request (every advertised input, every advertised output, statistics it can use), KServe's string parameters, and
HTTP clients or probes pointed at the metrics port. Plus the server's start-up checks that must come first."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton

from ponder.errors import PonderError
from ponder.serve.engine import Engine
from ponder.serve.server import TLSFiles, create_server

TEXT = b"def f(x): return x + 1  # a line of code"


@pytest.fixture(scope="module")
def server(model_repository):
    # One compute slot, so that concurrent clients really wait in the queue.
    srv, port = create_server(model_repository, "127.0.0.1:0", metrics_port=0, workers=1, max_queue=16)
    srv.start()
    yield srv, f"127.0.0.1:{port}"
    srv.drain(grace=2)


def _ids(batch: int = 4) -> np.ndarray:
    row = np.frombuffer(TEXT[:32], dtype=np.uint8).astype(np.int64)
    return np.stack([np.roll(row, i) for i in range(batch)])


def _input(ids: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    return tensor


def test_clients_without_a_deadline_wait_for_a_slot_instead_of_failing(server):
    """tritonclient sends no deadline unless told; four such clients on one slot must all be answered."""
    clients, per_client = 4, 12
    errors: list[str] = []
    answered = []
    start = threading.Barrier(clients)

    def work() -> None:
        client = triton.InferenceServerClient(server[1])
        start.wait()
        for _ in range(per_client):
            try:
                client.infer("tiny", [_input(_ids(8))])  # no client_timeout: no deadline on the wire
                answered.append(1)
            except Exception as exc:  # noqa: BLE001 (collected and reported)
                errors.append(str(exc))
        client.close()

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, f"{len(errors)} of {clients * per_client} failed, e.g. {errors[0]}"
    assert len(answered) == clients * per_client


def test_a_request_with_every_advertised_input_and_output_works(server, model_repository):
    """perf_analyzer sends every input the metadata lists and asks for every output it lists."""
    client = triton.InferenceServerClient(server[1])
    meta = client.get_model_metadata("tiny", "2")
    inputs = []
    for spec in meta.inputs:
        shape = [1 if d == -1 and i == 0 else 16 if d == -1 else d for i, d in enumerate(spec.shape)]
        assert spec.datatype == "INT64", f"{spec.name} cannot be filled by a generic client as {spec.datatype}"
        tensor = triton.InferInput(spec.name, shape, spec.datatype)
        tensor.set_data_from_numpy(np.full(shape, 65, dtype=np.int64))
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(o.name) for o in meta.outputs]
    result = client.infer("tiny", inputs, model_version="2", outputs=outputs)
    for spec in meta.outputs:
        array = result.as_numpy(spec.name)
        assert array is not None and array.dtype == {"FP32": np.float32, "INT64": np.int64}[spec.datatype]
        assert [d for d in spec.shape if d != -1] == [d for d, s in zip(array.shape, spec.shape, strict=True)
                                                         if s != -1]
    config = client.get_model_config("tiny", "2").config
    assert [i.name for i in config.input] == [i.name for i in meta.inputs]
    assert not any(i.optional for i in config.input)
    assert "text_input" in config.parameters["generation"].string_value  # the other request shape is findable


def _text(prompt: bytes, sampling: str) -> list[triton.InferInput]:
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt], dtype=np.object_))
    params = triton.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([sampling.encode()], dtype=np.object_))
    return [text, params]


def test_statistics_count_input_infer_and_output_alike(server):
    """perf_analyzer: 'Server side statistics compute counts must be the same'."""
    client = triton.InferenceServerClient(server[1])
    client.infer("tiny", [_input(_ids(2))], model_version="1")
    client.infer("tiny", _text(b"The ", '{"max_tokens": 3}'), model_version="1")
    before = client.get_inference_statistics("tiny", "1").model_stats[0]
    client.infer("tiny", [_input(_ids(2))], model_version="1")
    model = client.get_inference_statistics("tiny", "1").model_stats[0]
    stats = model.inference_stats
    # as Triton's: the durations count requests, inference_count rows, execution_count model runs
    assert stats.success.count == stats.queue.count == stats.compute_input.count == stats.compute_infer.count \
        == stats.compute_output.count
    assert model.inference_count - before.inference_count == 2
    assert model.execution_count - before.execution_count == 1
    assert before.execution_count >= 4  # one forward pass and three decode steps
    assert stats.compute_input.ns > 0 and stats.compute_output.ns > 0


def test_numeric_parameters_sent_as_strings_as_the_kserve_sdk_does(server, model_repository):
    engine = Engine(model_repository / "tiny" / "2" / "model.onnx")
    client = triton.InferenceServerClient(server[1])
    ids = _ids(2)
    as_string = client.infer("tiny", [_input(ids)], parameters={"act_threshold": "0.3"}).get_response()
    expected = engine.infer(ids, 0.3)
    assert as_string.parameters["layers_executed"].int64_param == expected.layers_executed < 3
    generated = client.infer("tiny", _text(b"The ", '{"max_tokens": "2"}'), parameters={"act_threshold": "0.5"})
    assert generated.as_numpy("token_ids").shape == (2,)
    for key, value, named in (("act_threshold", "half", "'half'"), ("act_threshold", "1.5", "1.5"),
                              ("max_tokens", "2.5", "'2.5'")):
        with pytest.raises(Exception) as refused:
            if key == "act_threshold":
                client.infer("tiny", [_input(ids)], parameters={key: value})
            else:
                client.infer("tiny", _text(b"The ", json.dumps({key: value})))
        assert "INVALID_ARGUMENT" in str(refused.value) or "StatusCode.INVALID_ARGUMENT" in repr(refused.value)
        assert key in str(refused.value) and named in str(refused.value)


def test_the_metrics_port_serves_metrics_only(server):
    port = server[0].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200 and b"ponder_requests" in response.read()
    for path in ("/", "/v2/health/live", "/v2/health/ready", "/v2/models/no-such-model/ready", "/metricsx"):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
        assert answer.value.code == 404, path


def test_a_port_in_use_is_reported_before_any_model_is_loaded(tmp_path, monkeypatch):
    from ponder.serve.repository import Repository

    def must_not_load(*args, **kwargs):
        raise AssertionError("the models were loaded before the port was checked")

    monkeypatch.setattr(Repository, "__init__", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for address, metrics_port in ((f"127.0.0.1:{taken.getsockname()[1]}", None),
                                      ("127.0.0.1:0", taken.getsockname()[1])):
            with pytest.raises(PonderError, match="cannot (listen|serve metrics) on .*"):
                create_server(tmp_path, address, metrics_port=metrics_port)


def test_tls_files_that_are_not_pem_are_named(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    with pytest.raises(PonderError, match="--tls-cert .*cert.pem.* is not a PEM certificate"):
        create_server(tmp_path, "127.0.0.1:0", tls=TLSFiles(cert, key))
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(PonderError, match="--tls-key .*key.pem.* is not a PEM private key"):
        create_server(tmp_path, "127.0.0.1:0", tls=TLSFiles(cert, key))
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PonderError, match="must be a PEM certificate and its unencrypted PEM private key"):
        create_server(tmp_path, "127.0.0.1:0", tls=TLSFiles(cert, key))


def test_message_limit_beyond_what_grpc_can_hold_is_refused(tmp_path):
    with pytest.raises(PonderError, match="--max-message-mb must be between 1 and 2047, got 4096"):
        create_server(tmp_path, "127.0.0.1:0", max_message_mb=4096)


def test_no_deadline_means_no_limit_on_the_wait():
    """Without a deadline grpc's time_remaining() is enormous (tritonclient sends none): no deadline at all, never
    a timestamp out of range (perf_analyzer's INTERNAL "OverflowError: timestamp out of range")."""
    import asyncio

    from ponder.serve.servicer import deadline_of

    class Context:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

    async def check():
        now = asyncio.get_running_loop().time()
        assert deadline_of(Context(None)) is None and deadline_of(Context(1e12)) is None
        assert deadline_of(Context(float("inf"))) is None
        assert now + 1.4 < deadline_of(Context(1.5)) < now + 1.6

    asyncio.run(check())


def test_ponder_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    from helpers import run_ponder

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_ponder("serve", "--repository", str(tmp_path), "--address", f"127.0.0.1:{port}",
                          "--metrics-port", "-1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ponder: error: cannot listen on 127.0.0.1:{port}: Address already in use (another process holds the "
        "port: choose another with --address)"]
