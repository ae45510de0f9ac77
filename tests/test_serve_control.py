"""Model control as Triton does it (none, explicit, poll) and warm-up, with real servers on 127.0.0.1 and the
stock tritonclient over both protocols."""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from helpers import wait_for
from tritonclient.utils import InferenceServerException

from ponder.serve.server import create_server


def ids_input(ids):
    tensor = triton_grpc.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    return tensor


def text_inputs(text: str, tokens: int):
    inputs = []
    for name, datatype, value in (("text_input", "BYTES", text.encode()),
                                  ("sampling_parameters", "BYTES", json.dumps({"max_tokens": tokens}).encode())):
        tensor = triton_grpc.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=object))
        inputs.append(tensor)
    return inputs


@pytest.fixture
def one_model(model_repository, tmp_path):
    """A repository of its own holding tiny/1 only (tests add and remove versions)."""
    shutil.copytree(model_repository / "tiny" / "1", tmp_path / "tiny" / "1")
    return tmp_path


def test_explicit_mode_loads_and_unloads_and_an_unload_under_load_loses_nothing(one_model, caplog):
    caplog.set_level(logging.INFO, logger="ponder.serve")
    srv, port = create_server(one_model, "127.0.0.1:0", model_control_mode="explicit", http_port=0, workers=1)
    srv.start()
    try:
        grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        http_client = triton_http.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
        assert not grpc_client.is_model_ready("tiny")  # explicit: nothing at start
        index = grpc_client.get_model_repository_index(as_json=True)["models"]
        assert index == [{"name": "tiny", "state": "UNAVAILABLE", "reason": "not loaded"}]
        http_client.load_model("tiny")
        assert grpc_client.is_model_ready("tiny") and http_client.is_model_ready("tiny", "1")
        assert "model tiny version 1 warmed up in" in caplog.text  # ready only after its warm-up runs
        # unload while generations and scoring requests are in flight: every one of them finishes
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(grpc_client.infer, "tiny", text_inputs("The ", 300)) for _ in range(3)]
            futures += [pool.submit(grpc_client.infer, "tiny", [ids_input(np.ones((2, 16), np.int64))])
                        for _ in range(3)]
            wait_for(lambda: srv.schedulers[("tiny", "1")].busy, what="the requests to reach the model")
            grpc_client.unload_model("tiny")
            results = [f.result(timeout=60) for f in futures]
        assert all(len(r.as_numpy("token_ids")) == 300 for r in results[:3])
        assert all(r.as_numpy("logits").shape == (2, 16, 256) for r in results[3:])
        assert not grpc_client.is_model_ready("tiny")
        with pytest.raises(InferenceServerException, match="not in the repository|not loaded"):
            grpc_client.infer("tiny", [ids_input(np.ones((1, 4), np.int64))])
        with pytest.raises(InferenceServerException, match="not loaded"):
            http_client.unload_model("tiny")
        with pytest.raises(InferenceServerException, match="not in the repository"):
            grpc_client.load_model("nope")
    finally:
        srv.stop()


def test_none_mode_refuses_load_and_unload(model_repository):
    srv, port = create_server(model_repository, "127.0.0.1:0", workers=1)
    srv.start()
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException, match="needs --model-control-mode explicit") as info:
                call("tiny")
            assert "FAILED_PRECONDITION" in str(info.value.status())
        assert client.is_model_ready("tiny")
    finally:
        srv.stop()


def test_poll_mode_serves_a_new_version_once_ready_and_retires_a_removed_one(one_model):
    srv, port = create_server(one_model, "127.0.0.1:0", model_control_mode="poll", repository_poll_secs=0.2,
                              workers=1)
    srv.start()
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.get_model_metadata("tiny", as_json=True)["versions"] == ["1"]
        staging = one_model / "tiny" / ".incoming"
        shutil.copytree(one_model / "tiny" / "1", staging)
        staging.rename(one_model / "tiny" / "2")  # appears whole, as docs/deploy.md says to write it
        wait_for(lambda: client.is_model_ready("tiny", "2"), what="version 2 to be served")
        reply = client.infer("tiny", [ids_input(np.ones((1, 4), np.int64))])  # the newest by default
        assert reply.get_response().model_version == "2"
        shutil.rmtree(one_model / "tiny" / "1")
        wait_for(lambda: ("tiny", "1") not in srv.schedulers, what="version 1 to be retired")
        with pytest.raises(InferenceServerException, match="does not exist"):
            client.infer("tiny", [ids_input(np.ones((1, 4), np.int64))], model_version="1")
    finally:
        srv.stop()


def test_warmup_batch_sizes_come_from_config_json_and_a_bad_list_is_reported(one_model, caplog):
    caplog.set_level(logging.INFO, logger="ponder.serve")
    config = one_model / "tiny" / "1" / "config.json"
    shutil.copytree(one_model / "tiny" / "1", one_model / "tiny" / "2")
    good = json.loads(config.read_text())
    config.write_text(json.dumps({**good, "warmup": {"batch_sizes": [1, 3]}}))
    (one_model / "tiny" / "2" / "config.json").write_text(json.dumps({**good, "warmup": {"batch_sizes": [0]}}))
    srv, port = create_server(one_model, "127.0.0.1:0", workers=1)
    srv.start()
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert "model tiny version 1 warmed up in" in caplog.text and "(batch sizes 1, 3)" in caplog.text
        assert client.is_model_ready("tiny", "1") and not client.is_model_ready("tiny", "2")
        index = {m["version"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert "warmup.batch_sizes" in index["2"]["reason"]
    finally:
        srv.stop()
