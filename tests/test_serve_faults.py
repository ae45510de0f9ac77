"""The server under load and faults: a full queue, a deadline that passes in the queue, SIGTERM draining, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from helpers import wait_for

from ponder.generation import SamplingParams
from ponder.serve import inference_pb2 as pb
from ponder.serve import inference_pb2_grpc as pb_grpc
from ponder.serve.client import Client, ServerError
from ponder.serve.repository import Repository
from ponder.serve.server import TLSFiles, create_server


class Gate:
    """Holds every model run at the gate until opened, counting the runs that were really computed."""

    def __init__(self, engine) -> None:
        self.open = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0
        real = engine.infer

        def infer(*args, **kwargs):
            self.calls += 1
            self.entered.release()
            assert self.open.wait(30)
            return real(*args, **kwargs)

        engine.infer = infer


@pytest.fixture
def gated(model_repository):
    repo = Repository(model_repository)  # its own engines: the gate stays out of other tests
    srv, port = create_server(repo, "127.0.0.1:0", workers=1, max_queue=1)
    gate = Gate(repo.find("tiny").engine)  # after the warm-up runs
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield srv, pb_grpc.GRPCInferenceServiceStub(channel), gate
    gate.open.set()
    channel.close()
    srv.stop()


def queued(srv) -> int:
    return sum(s.pending for s in srv.schedulers.values())


def ids_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4])
    request.raw_input_contents.append(np.array([[1, 2, 3, 4]], dtype="<i8").tobytes())
    return request


def test_a_full_queue_answers_resource_exhausted_and_the_admitted_requests_finish(gated):
    srv, stub, gate = gated
    first = stub.ModelInfer.future(ids_request(), timeout=30)
    assert gate.entered.acquire(timeout=20)  # computing (held at the gate)
    second = stub.ModelInfer.future(ids_request(), timeout=30)
    wait_for(lambda: queued(srv) == 1, what="the second request to queue")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(ids_request(), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the queue of this model is full (1 requests waiting; --max-queue" in info.value.details()
    gate.open.set()
    for future in (first, second):
        assert future.result().parameters["layers_executed"].int64_param >= 1
    assert gate.calls == 2
    assert second.result().parameters["queue_ms"].double_param > 0


def test_a_request_whose_deadline_passes_in_the_queue_is_not_computed(gated):
    srv, stub, gate = gated
    first = stub.ModelInfer.future(ids_request(), timeout=30)
    assert gate.entered.acquire(timeout=20)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(ids_request(), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: queued(srv) == 0, what="the expired request to leave the queue")
    gate.open.set()
    first.result()
    assert gate.calls == 1  # the expired one never reached the model
    stats = srv.servicer.repo.find("tiny").stats
    assert stats.execution_count == 1 and stats.fail.count == 1


# -- SIGTERM ------------------------------------------------------------------------------------------------------
def start_server(*args: str) -> tuple[subprocess.Popen, dict, queue.Queue]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PONDER_")}
    proc = subprocess.Popen([sys.executable, "-m", "ponder", "serve", *args], stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    found: dict = {}
    deadline = time.monotonic() + 60
    while "metrics" not in found:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise AssertionError("ponder serve did not start") from None
        if "listening on 127.0.0.1:" in line:
            found["port"] = int(line.split("listening on 127.0.0.1:")[1].split()[0])
        if "metrics on http://" in line:
            found["metrics"] = line.split("metrics on ")[1].strip()
    return proc, found, lines


def metric(url: str, name: str) -> float:
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in {url}")


def test_sigterm_drains_in_flight_requests_then_exits_zero(model_repository):
    proc, found, lines = start_server("--repository", str(model_repository), "--address", "127.0.0.1:0",
                                      "--metrics-port", "0", "--http-port", "0", "--workers", "1", "--grace", "60")
    address = f"127.0.0.1:{found['port']}"
    replies, finished = [], []

    def generate():
        with Client(address, timeout=60) as client:
            replies.append(client.generate_once("tiny", "def ", sampling=SamplingParams(max_tokens=1024),
                                                  threshold=1.0))
            finished.append(time.monotonic())

    workers = [threading.Thread(target=generate) for _ in range(3)]  # one computing, two queued
    for w in workers:
        w.start()
    wait_for(lambda: metric(found["metrics"], "ponder_in_flight") == 3, what="three requests in flight")
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.05)
    with Client(address, timeout=10) as late, pytest.raises(ServerError) as info:
        late.infer("tiny", np.array([[1, 2, 3]]))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE  # new work is refused while draining
    for w in workers:
        w.join(60)
    assert proc.wait(60) == 0
    assert len(replies) == 3 and all(len(r.outputs["token_ids"]) == 1024 for r in replies)
    assert max(finished) > signalled  # work was still going on when the signal came, and it finished
    log = "".join(iter_lines(lines))
    assert "SIGTERM: draining" in log and "stopped" in log and "Traceback" not in log


def test_sigterm_exits_within_grace_plus_one_second_whatever_is_in_flight(model_repository):
    """Fault 5: with long generations in flight, SIGTERM exited after 6.4 s with --grace 1. Now: within grace + 1 s;
    work that cannot finish in the grace period gets UNAVAILABLE."""
    proc, found, lines = start_server("--repository", str(model_repository), "--address", "127.0.0.1:0",
                                      "--metrics-port", "0", "--http-port", "0", "--workers", "1", "--grace", "1")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{found['port']}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="tiny", model_version="1")
        for name, datatype, value in (("text_input", "BYTES", b"def "), ("stream", "BOOL", True),
                                      ("sampling_parameters", "BYTES", b'{"max_tokens": 1024}')):
            tensor = request.inputs.add(name=name, datatype=datatype, shape=[1])
            (tensor.contents.bytes_contents if datatype == "BYTES" else tensor.contents.bool_contents).append(value)
        unread = [stub.ModelStreamInfer(iter([request])) for _ in range(2)]  # paused: they never finish
        read = stub.ModelStreamInfer(iter([request] * 50))  # 50 generations in a row: longer than the grace
        first = next(read)
        assert not first.error_message
        wait_for(lambda: metric(found["metrics"], "ponder_in_flight") >= 3, what="the generations to start")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        codes = set()
        try:
            for reply in read:
                if reply.error_message:
                    codes.add(reply.error_message)
        except grpc.RpcError as exc:
            codes.add(exc.code().name)
        assert proc.wait(10) == 0
        took = time.monotonic() - signalled
        assert took < 1 + 1, f"exited {took:.1f} s after SIGTERM with --grace 1"
        assert codes and all("shutting down" in c or c in ("UNAVAILABLE", "CANCELLED") for c in codes), codes
        for call in unread:
            call.cancel()
        channel.close()
    finally:
        proc.kill()
    log = "".join(iter_lines(lines))
    assert "Traceback" not in log


def iter_lines(lines: queue.Queue):
    while not lines.empty():
        yield lines.get()


# -- TLS ----------------------------------------------------------------------------------------------------------
def make_certificates(folder):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(stem, key, cert):
        (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("ponder test CA")).issuer_name(name("ponder test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    for stem, sans in (("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       ("client", [x509.DNSName("client")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(ca_key, hashes.SHA256()))
        write(stem, key, cert)


def test_tls_with_a_generated_certificate(tmp_path, model_repository):
    import tritonclient.grpc as triton

    make_certificates(tmp_path)
    srv, port = create_server(model_repository, "127.0.0.1:0",
                              tls=TLSFiles(tmp_path / "server.pem", tmp_path / "server.key"))
    srv.start()
    try:
        address = f"127.0.0.1:{port}"
        with Client(address, tls_ca=tmp_path / "ca.pem") as client:
            assert client.live()
            assert client.infer("tiny", np.array([[1, 2, 3]]), threshold=1.0).layers_executed == 3
        stock = triton.InferenceServerClient(address, ssl=True, root_certificates=str(tmp_path / "ca.pem"))
        assert stock.is_server_live()
        with Client(address, timeout=5) as plain, pytest.raises(ServerError) as info:
            plain.live()  # plaintext against a TLS port
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_tls_with_client_certificates_required(tmp_path, model_repository):
    make_certificates(tmp_path)
    srv, port = create_server(model_repository, "127.0.0.1:0", tls=TLSFiles(
        tmp_path / "server.pem", tmp_path / "server.key", ca=tmp_path / "ca.pem"))
    srv.start()
    ca = (tmp_path / "ca.pem").read_bytes()
    try:
        with_cert = grpc.ssl_channel_credentials(ca, (tmp_path / "client.key").read_bytes(),
                                                 (tmp_path / "client.pem").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", with_cert) as channel:
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
        with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca)) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()
