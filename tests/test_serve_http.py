"""The Open Inference Protocol over HTTP/REST: the stock tritonclient.http and curl against a real server on
127.0.0.1, answering what the gRPC front end answers (one servicer, one scheduler)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from ponder.serve.server import create_server


@pytest.fixture(scope="module")
def server(model_repository):
    srv, port = create_server(model_repository, "127.0.0.1:0", http_port=0, workers=1, metrics_port=None)
    srv.start()
    yield srv, f"127.0.0.1:{port}", f"127.0.0.1:{srv.http_port}"
    srv.drain(grace=2)


def ids_input(module, ids, binary=True):
    tensor = module.InferInput("input_ids", list(ids.shape), "INT64")
    if module is triton_http:
        tensor.set_data_from_numpy(ids, binary_data=binary)
    else:
        tensor.set_data_from_numpy(ids)
    return tensor


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_tritonclient_http_health_metadata_config_statistics_and_index(server):
    _, _, http = server
    client = triton_http.InferenceServerClient(http)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert not client.is_model_ready("broken")  # failed to load: there, not ready
    assert client.get_server_metadata()["name"] == "ponder"
    meta = client.get_model_metadata("tiny", "1")
    assert meta["name"] == "tiny" and meta["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
    assert meta["parameters"] == {"precision": "fp32"}  # ponder export --precision
    config = client.get_model_config("tiny")
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [-1]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    index = {(m["name"], m.get("version")): m for m in client.get_model_repository_index()}
    assert index[("tiny", "1")]["state"] == "READY" and index[("broken", "1")]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException, match="not in the repository"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_tritonclient_http_infer_equals_the_grpc_answer(server, binary):
    _, grpc_address, http = server
    ids = np.frombuffer(b"The return value", dtype=np.uint8).astype(np.int64)[None].repeat(2, axis=0)
    outputs = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "token_depth")]
    client = triton_http.InferenceServerClient(http)
    before = client.get_inference_statistics("tiny", "1")["model_stats"][0]["inference_count"]
    over_http = client.infer("tiny", [ids_input(triton_http, ids, binary)], model_version="1", outputs=outputs,
                             parameters={"act_threshold": 0.5})
    over_grpc = triton_grpc.InferenceServerClient(grpc_address).infer(
        "tiny", [ids_input(triton_grpc, ids)], model_version="1", parameters={"act_threshold": 0.5})
    np.testing.assert_allclose(over_http.as_numpy("logits"), over_grpc.as_numpy("logits"), atol=1e-6)
    np.testing.assert_array_equal(over_http.as_numpy("token_depth"), over_grpc.as_numpy("token_depth"))
    params = over_http.get_response()["parameters"]
    assert params["layers_executed"] == over_grpc.get_response().parameters["layers_executed"].int64_param
    assert {"compute_ms", "queue_ms", "server_ms", "mean_token_depth", "batch_size"} <= set(params)
    after = client.get_inference_statistics("tiny", "1")["model_stats"][0]["inference_count"]
    assert after - before == 4  # two rows over each protocol, one set of statistics


def test_curl_health_and_json_infer(server):
    _, _, http = server
    live = subprocess.run(["curl", "-sf", f"http://{http}/v2/health/live"], capture_output=True, text=True,
                          timeout=30)
    assert live.returncode == 0 and json.loads(live.stdout) == {"live": True}
    body = {"inputs": [{"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [[72, 105, 33, 10]]}],
            "parameters": {"act_threshold": 0.5}}
    reply = subprocess.run(["curl", "-s", "-X", "POST", f"http://{http}/v2/models/tiny/versions/2/infer", "-H",
                            "Content-Type: application/json", "-d", json.dumps(body)], capture_output=True, text=True,
                           timeout=30)
    data = json.loads(reply.stdout)
    outputs = {o["name"]: o for o in data["outputs"]}
    assert data["model_version"] == "2" and outputs["logits"]["shape"] == [1, 4, 256]
    assert len(outputs["logits"]["data"]) == 4 * 256 and outputs["token_depth"]["datatype"] == "INT64"
    assert data["parameters"]["layers_executed"] == max(outputs["token_depth"]["data"])


def test_errors_are_an_http_status_and_a_json_message(server):
    _, _, http = server
    base = f"http://{http}/v2/models"
    cases = [
        (f"{base}/nope/infer", b'{"inputs": []}', 404, "not in the repository"),
        (f"{base}/tiny/infer", b"{not json", 400, "not valid JSON"),
        (f"{base}/tiny/infer", b'{"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", '
                               b'"data": [1, 999]}]}', 400, "token ids must be in [0, 256)"),
        (f"{base}/tiny/infer", json.dumps({"inputs": [{"name": "input_ids", "shape": [64, 32], "datatype": "INT64",
                                                      "data": [0] * 2048}]}).encode(), 400, "max_batch_size"),
        (f"{base}/broken/infer", b'{"inputs": []}', 503, "failed to load"),
    ]
    for url, body, status, words in cases:
        code, reply, _ = post(url, body)
        assert code == status and words in json.loads(reply)["error"], (url, code, reply)
    head = json.dumps({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    code, reply, _ = post(f"{base}/tiny/infer", head + b"XXXX", {"Inference-Header-Content-Length": str(len(head))})
    assert code == 400 and "binary_data_size 16 runs past the 4 bytes" in json.loads(reply)["error"]


def test_generate_and_generate_stream_as_triton_names_them(server, model_repository):
    from ponder.generation import SamplingParams
    from ponder.serve.engine import Engine

    _, _, http = server
    engine = Engine(model_repository / "tiny" / "1" / "model.onnx")
    alone = engine.generate("The ", SamplingParams(max_tokens=6))
    body = json.dumps({"text_input": "The ", "exclude_input_in_output": True, "parameters": {"max_tokens": 6}})
    code, reply, _ = post(f"http://{http}/v2/models/tiny/versions/1/generate", body.encode())
    data = json.loads(reply)
    assert code == 200 and data["token_ids"] == alone["token_ids"] and data["finish_reason"] == "length"
    code, reply, headers = post(f"http://{http}/v2/models/tiny/versions/1/generate_stream", body.encode())
    events = [json.loads(line[len("data: "):]) for line in reply.decode().splitlines() if line.startswith("data: ")]
    assert code == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert [e["token_ids"][0] for e in events] == alone["token_ids"]
    assert events[-1]["triton_final_response"] and not events[0]["triton_final_response"]
    code, reply, _ = post(f"http://{http}/v2/models/tiny/generate_stream",
                          json.dumps({"text_input": "x", "parameters": {"max_tokens": 0}}).encode())
    assert code == 400 and "max_tokens" in json.loads(reply)["error"]


def test_ponder_serve_http_port_flag(tmp_path):
    from helpers import run_ponder

    proc = run_ponder("serve", "--repository", str(tmp_path), "--http-port", "70000", check=False)
    assert proc.returncode == 2 and "--http-port must be a port" in proc.stderr


def test_http_serves_tls_with_the_grpc_certificate(tmp_path, model_repository):
    import http.client
    import ssl

    from test_serve_faults import make_certificates

    from ponder.serve.server import TLSFiles

    make_certificates(tmp_path)
    srv, _ = create_server(model_repository, "127.0.0.1:0", http_port=0, workers=1,
                           tls=TLSFiles(tmp_path / "server.pem", tmp_path / "server.key"))
    srv.start()
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{srv.http_port}/v2/health/ready", context=context,
                                    timeout=10) as reply:
            assert reply.status == 200 and json.loads(reply.read()) == {"ready": True}
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):  # plain HTTP, TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/v2/health/ready", timeout=10).read()
    finally:
        srv.stop()
