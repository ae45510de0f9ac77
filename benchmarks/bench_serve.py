"""The server's cost and what batching buys, measured: the same model in-process on ONNX Runtime and through
`ponder serve` with the stock tritonclient, then generation and a soak, all in one run.

    python benchmarks/bench_serve.py [--repository models --name demo] [--requests 400] [--rounds 3]
                                     [--soak-seconds 60] [--out benchmarks/results/serve.json]

The server runs in its own process (as in production) on 127.0.0.1 with its defaults (a scheduler per model that
batches, --max-queue-delay-us 0). Scoring: in-process calls the Engine unbatched (one thread, then 8 threads);
the server gets the same requests from one client, then 8. The two sides alternate in rounds. Generation: greedy
streams of --gen-tokens tokens through ModelStreamInfer, one alone and 8 together (aggregate tokens/s), and the
first-token latency of 16 streams started at once. Soak: 16 clients for --soak-seconds plus 80 idle streams,
with a health check every 100 ms and the server's RSS sampled.

Goals (issue 25): at concurrency 8 the server's throughput >= 1.0x in-process; the p50 it adds at concurrency 1
<= the empty-RPC round trip of the same run + 0.3 ms; 8 streams >= 3x one stream's tokens/s; first-token p50
< 100 ms with 16 streams; under the soak no errors, health SERVING within 50 ms, RSS growth < 10% after 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ponder import __version__

GOAL_ADDED_OVER_EMPTY_MS = 0.3
GOAL_THROUGHPUT_RATIO = 1.0
GOAL_STREAMS_SPEEDUP = 3.0
GOAL_FIRST_TOKEN_MS = 100.0
GOAL_HEALTH_MS = 50.0
GOAL_RSS_GROWTH = 0.10


def ensure_model(repository: Path, name: str) -> Path:
    from ponder.model_repository import model_path, versions

    folder = repository / name
    if versions(folder):
        return model_path(repository, name)
    from ponder.config import load_config
    from ponder.export import export_checkpoint
    from ponder.train import Trainer

    run = Path("runs/demo")
    if not (run / "latest").exists():
        print("training the demo model into runs/demo...", file=sys.stderr)
        Trainer(load_config(preset="demo"), run).train()
    print(f"exporting runs/demo to {folder}/1...", file=sys.stderr)
    return export_checkpoint(run, repository=repository, name=name, version=1).path


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def drive(call, concurrency: int, requests: int) -> tuple[list[float], float]:
    """Run ``requests`` calls from ``concurrency`` threads; per-call latencies (ms) and the wall time (s)."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = requests // concurrency
    barrier = threading.Barrier(concurrency + 1)

    def worker(index: int) -> None:
        own = []
        state = call(index, setup=True)
        barrier.wait()
        for _ in range(per_thread):
            start = time.perf_counter()
            call(index, state=state)
            own.append((time.perf_counter() - start) * 1e3)
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


def start_server(repository: Path, threads: int | None = None,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str, str]:
    flags = ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen([sys.executable, "-m", "ponder", "serve", "--repository", str(repository),
                             "--address", "127.0.0.1:0", "--metrics-port", "-1", "--http-port", "0", *flags,
                             *extra], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 120
    address = None
    while True:
        line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
        if "listening on 127.0.0.1:" in line:
            address = "127.0.0.1:" + line.split("listening on 127.0.0.1:")[1].split()[0]
        if "HTTP/REST on http://" in line:
            http = line.split("HTTP/REST on http://")[1].split("/")[0]
            assert address is not None
            return proc, address, http
        if "error" in line.lower():
            print(line, end="", file=sys.stderr)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def generation_request(pb: object, name: str, version: str, text: str, tokens: int) -> object:
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    for key, datatype, value in (("text_input", "BYTES", text.encode()), ("stream", "BOOL", True),
                                 ("sampling_parameters", "BYTES", json.dumps({"max_tokens": tokens}).encode())):
        tensor = request.inputs.add(name=key, datatype=datatype, shape=[1])
        if datatype == "BYTES":
            tensor.contents.bytes_contents.append(value)
        else:
            tensor.contents.bool_contents.append(value)
    return request


def stream_tokens(stub, request) -> tuple[float, float, int]:
    """One streamed generation: (seconds to the first token, seconds in all, tokens)."""
    start = time.perf_counter()
    first, count = None, 0
    for reply in stub.ModelStreamInfer(iter([request]), timeout=300):
        if reply.error_message:
            raise RuntimeError(reply.error_message)
        count += 1
        if first is None:
            first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, count


def concurrent_streams(stub, requests: list) -> tuple[list[float], float, int]:
    """Streams started at once: their first-token latencies (ms), the wall time (s) and the tokens in all."""
    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests) + 1)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = stream_tokens(stub, requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return [r[0] * 1e3 for r in results], wall, sum(r[2] for r in results)


def soak(address: str, name: str, version: str, pid: int, ids: np.ndarray, seconds: float) -> dict:
    """16 scoring clients for ``seconds`` plus 80 idle streams; health checked every 100 ms; RSS sampled."""
    import grpc
    import tritonclient.grpc as triton
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ponder.serve import inference_pb2_grpc as pb_grpc

    stop = threading.Event()
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def nothing():
        stop.wait()
        return
        yield

    idle = [stub.ModelStreamInfer(nothing()) for _ in range(80)]

    def client() -> None:
        c = triton.InferenceServerClient(address)
        tensor = triton.InferInput("input_ids", list(ids.shape), "INT64")
        tensor.set_data_from_numpy(ids)
        while not stop.is_set():
            try:
                c.infer(name, [tensor], model_version=version, client_timeout=10)
                with lock:
                    done[0] += 1
            except Exception as exc:  # counted: the goal is zero
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    checks: list[float] = []
    unhealthy = 0
    clients = [threading.Thread(target=client) for _ in range(16)]
    for t in clients:
        t.start()
    start = time.monotonic()
    rss: list[tuple[float, float]] = []
    while time.monotonic() - start < seconds:
        t0 = time.perf_counter()
        try:
            ok = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            ok = False
        checks.append((time.perf_counter() - t0) * 1e3)
        unhealthy += not ok
        if not rss or time.monotonic() - start - rss[-1][0] >= 1.0:
            rss.append((time.monotonic() - start, rss_mb(pid)))
        time.sleep(0.1)
    stop.set()
    for t in clients:
        t.join(30)
    for call in idle:
        call.cancel()
    channel.close()
    after_warmup = [m for t, m in rss if t >= 10] or [rss[-1][1]]
    growth = (rss[-1][1] - after_warmup[0]) / after_warmup[0]
    return {"seconds": seconds, "requests": done[0], "errors": len(errors), "first_errors": errors[:5],
            "health_checks": len(checks), "health_not_serving": unhealthy, "health_p50_ms": float(np.median(checks)),
            "health_max_ms": max(checks), "rss_mb_at_10s": after_warmup[0], "rss_mb_end": rss[-1][1],
            "rss_growth_after_10s": growth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--name", default="demo")
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement (default: 400)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--seq", type=int, default=64, help="prompt length in tokens (default: 64)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads per run, both sides (default: ORT's)")
    parser.add_argument("--gen-tokens", type=int, default=64, help="tokens per generation (default: 64)")
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="soak length; 0 skips it (default: 60)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG=VALUE",
                        help="an extra `ponder serve` flag, e.g. --server-arg=--workers=1 (repeatable)")
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args(argv)

    import grpc
    import tritonclient.grpc as triton

    from ponder.data import embedded_corpus
    from ponder.serve import inference_pb2 as pb
    from ponder.serve import inference_pb2_grpc as pb_grpc
    from ponder.serve.engine import Engine

    path = ensure_model(args.repository, args.name)
    engine = Engine(path, threads=args.threads, spinning=False)  # configured as the server configures its engines
    seq = min(args.seq, engine.max_seq_len)
    corpus = embedded_corpus()
    text = corpus.encode("utf-8")[1000:1000 + seq]
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)[None] % engine.vocab_size
    version = path.parent.name

    def local(index: int, setup: bool = False, state=None):
        if setup:
            return None
        return engine.infer(ids)

    extra = tuple(part for flag in args.server_arg for part in flag.split("=", 1))
    proc, address, http_address = start_server(args.repository, threads=args.threads, extra=extra)
    try:
        def remote(index: int, setup: bool = False, state=None):
            if setup:
                client = triton.InferenceServerClient(address)
                tensor = triton.InferInput("input_ids", list(ids.shape), "INT64")
                tensor.set_data_from_numpy(ids)
                return client, tensor
            client, tensor = state
            reply = client.infer(args.name, [tensor], model_version=version)
            return reply

        import tritonclient.http as triton_http

        def http(index: int, setup: bool = False, state=None):
            if setup:
                client = triton_http.InferenceServerClient(http_address)
                tensor = triton_http.InferInput("input_ids", list(ids.shape), "INT64")
                tensor.set_data_from_numpy(ids, binary_data=True)
                return client, tensor
            client, tensor = state
            return client.infer(args.name, [tensor], model_version=version)

        # warm up every side and check they agree
        check = remote(0, state=remote(0, setup=True))
        np.testing.assert_allclose(check.as_numpy("logits"), engine.infer(ids).logits, atol=1e-5)
        np.testing.assert_allclose(http(0, state=http(0, setup=True)).as_numpy("logits"), engine.infer(ids).logits,
                                   atol=1e-5)
        for call in (local, remote, http):
            drive(call, 8, 80)
        samples: dict[tuple[str, int], dict] = {}
        state = remote(0, setup=True)
        http_state = http(0, setup=True)
        breakdown: dict[str, list[float]] = {"server_minus_compute_ms": [], "round_trip_minus_server_ms": [],
                                             "empty_rpc_ms": []}
        for round_index in range(args.rounds):
            # concurrency 1: one call each way in turn, so both see the same machine at the same moment
            for mode in ("in-process", "server", "http"):
                samples.setdefault((mode, 1), {"latencies": [], "throughputs": []})
            for _ in range(args.requests):
                start = time.perf_counter()
                local(0)
                samples[("in-process", 1)]["latencies"].append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                reply = remote(0, state=state)
                ms = (time.perf_counter() - start) * 1e3
                samples[("server", 1)]["latencies"].append(ms)
                params = reply.get_response().parameters
                breakdown["server_minus_compute_ms"].append(params["server_ms"].double_param
                                                            - params["compute_ms"].double_param)
                breakdown["round_trip_minus_server_ms"].append(ms - params["server_ms"].double_param)
                start = time.perf_counter()
                state[0].is_server_live()
                breakdown["empty_rpc_ms"].append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                http(0, state=http_state)
                samples[("http", 1)]["latencies"].append((time.perf_counter() - start) * 1e3)
            # concurrency 8: the two sides in turn, each for the same number of requests
            batch_sizes = []
            for mode, call in (("in-process", local), ("server", remote), ("http", http)):
                if mode == "server":
                    def call(index, setup=False, state=None, _remote=remote, _sizes=batch_sizes):
                        reply = _remote(index, setup, state)
                        if not setup:
                            _sizes.append(reply.get_response().parameters["batch_size"].int64_param)
                        return reply
                latencies, seconds = drive(call, 8, args.requests)
                entry = samples.setdefault((mode, 8), {"latencies": [], "throughputs": []})
                entry["latencies"] += latencies
                entry["throughputs"].append(len(latencies) / seconds)
            samples[("server", 8)].setdefault("batch_sizes", []).extend(batch_sizes)
            print(f"scoring round {round_index + 1}/{args.rounds} done", file=sys.stderr)

        # generation through the shared decode runs
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        prompts = [corpus[200 * i: 200 * i + 24] for i in range(16)]
        requests = [generation_request(pb, args.name, version, p, args.gen_tokens) for p in prompts]
        concurrent_streams(stub, requests[:8])  # warm-up
        one_rates, eight_rates, first_16 = [], [], []
        for _ in range(args.rounds):
            _, wall, count = concurrent_streams(stub, requests[:1])
            one_rates.append(count / wall)
            _, wall, count = concurrent_streams(stub, requests[:8])
            eight_rates.append(count / wall)
            first, _, _ = concurrent_streams(stub, requests[:16])
            first_16 += first
        print("generation done", file=sys.stderr)
        soaked = soak(address, args.name, version, proc.pid, ids, args.soak_seconds) if args.soak_seconds > 0 \
            else None
    finally:
        proc.terminate()
        proc.wait(60)

    rows = []
    for (mode, concurrency), entry in samples.items():
        lat = entry["latencies"]
        # at concurrency 1 requests are back to back: throughput is 1 / mean latency
        rps = statistics.median(entry["throughputs"]) if entry["throughputs"] else 1e3 / statistics.mean(lat)
        rows.append({"mode": mode, "concurrency": concurrency, "requests": len(lat), "p50_ms": percentile(lat, 50),
                     "p99_ms": percentile(lat, 99), "throughput_rps": rps,
                     **({"mean_batch_size": float(np.mean(entry["batch_sizes"]))} if "batch_sizes" in entry else {})})
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    added_p50 = by[("server", 1)]["p50_ms"] - by[("in-process", 1)]["p50_ms"]
    http_added_p50 = by[("http", 1)]["p50_ms"] - by[("in-process", 1)]["p50_ms"]
    http_ratio = by[("http", 8)]["throughput_rps"] / by[("in-process", 8)]["throughput_rps"]
    empty = statistics.median(breakdown["empty_rpc_ms"])
    ratio = by[("server", 8)]["throughput_rps"] / by[("in-process", 8)]["throughput_rps"]
    generation = {"tokens_per_stream": args.gen_tokens, "one_stream_tokens_per_s": statistics.median(one_rates),
                  "eight_streams_tokens_per_s": statistics.median(eight_rates),
                  "first_token_p50_ms_16_streams": percentile(first_16, 50),
                  "first_token_p99_ms_16_streams": percentile(first_16, 99)}
    speedup = generation["eight_streams_tokens_per_s"] / generation["one_stream_tokens_per_s"]
    goals = {"throughput_c8": ratio >= GOAL_THROUGHPUT_RATIO,
             "added_p50": added_p50 <= empty + GOAL_ADDED_OVER_EMPTY_MS,
             "streams_speedup": speedup >= GOAL_STREAMS_SPEEDUP,
             "first_token_p50": generation["first_token_p50_ms_16_streams"] < GOAL_FIRST_TOKEN_MS}
    if soaked is not None:
        goals["soak"] = (soaked["errors"] == 0 and soaked["health_not_serving"] == 0
                         and soaked["health_max_ms"] <= GOAL_HEALTH_MS
                         and soaked["rss_growth_after_10s"] < GOAL_RSS_GROWTH)
    result = {
        "benchmark": "serve", "ponder_version": __version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "model": str(path), "seq": seq,
        "server_flags": list(extra), "layers_executed": int(check.get_response().parameters["layers_executed"]
                                                            .int64_param),
        "n_layers": engine.n_layers, "threads": args.threads, "rows": rows,
        "where_the_time_goes_p50_ms": {k: statistics.median(v) for k, v in breakdown.items()},
        "server_added_p50_ms": added_p50, "empty_rpc_p50_ms": empty,
        "goal_added_p50_ms": empty + GOAL_ADDED_OVER_EMPTY_MS,
        "throughput_ratio_c8": ratio, "goal_throughput_ratio": GOAL_THROUGHPUT_RATIO,
        "http_added_p50_ms": http_added_p50, "http_throughput_ratio_c8": http_ratio,
        "generation": generation, "streams_speedup": speedup, "soak": soaked, "goals_met": goals,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':11} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'batch':>6}")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["mode"])):
        batch = f"{r['mean_batch_size']:6.2f}" if "mean_batch_size" in r else f"{'':6}"
        print(f"{r['mode']:11} {r['concurrency']:4d} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['throughput_rps']:8.1f} "
              f"{batch}")
    parts = result["where_the_time_goes_p50_ms"]
    print(f"p50 of: server_ms - compute_ms {parts['server_minus_compute_ms']:.3f} ms; round trip - server_ms "
          f"{parts['round_trip_minus_server_ms']:.3f} ms; an empty RPC (ServerLive) {empty:.3f} ms")
    print(f"server adds {added_p50:.3f} ms at p50 (goal <= {empty + GOAL_ADDED_OVER_EMPTY_MS:.3f}: empty RPC + "
          f"{GOAL_ADDED_OVER_EMPTY_MS}); throughput at concurrency 8 is {ratio:.2f}x in-process (goal >= "
          f"{GOAL_THROUGHPUT_RATIO})")
    print(f"HTTP/REST (tritonclient.http, binary tensors): adds {http_added_p50:.3f} ms at p50; throughput at "
          f"concurrency 8 is {http_ratio:.2f}x in-process")
    print(f"generation: one stream {generation['one_stream_tokens_per_s']:.0f} tokens/s, 8 streams "
          f"{generation['eight_streams_tokens_per_s']:.0f} tokens/s ({speedup:.2f}x, goal >= {GOAL_STREAMS_SPEEDUP}); "
          f"first token with 16 streams p50 {generation['first_token_p50_ms_16_streams']:.1f} ms (goal < "
          f"{GOAL_FIRST_TOKEN_MS:.0f})")
    if soaked is not None:
        print(f"soak {soaked['seconds']:.0f} s: {soaked['requests']} requests, {soaked['errors']} errors, health "
              f"p50 {soaked['health_p50_ms']:.1f} ms max {soaked['health_max_ms']:.1f} ms "
              f"(goal <= {GOAL_HEALTH_MS:.0f}), "
              f"not serving {soaked['health_not_serving']}, RSS {soaked['rss_mb_at_10s']:.0f} -> "
              f"{soaked['rss_mb_end']:.0f} MB ({soaked['rss_growth_after_10s']:+.1%}, goal < {GOAL_RSS_GROWTH:.0%})")
    print(f"goals: {goals}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
