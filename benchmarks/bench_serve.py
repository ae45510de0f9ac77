"""The server's cost, measured: the same model in-process on ONNX Runtime and through `ponder serve` with the stock
tritonclient, at concurrency 1 and 8: p50/p99 latency and throughput.

    python benchmarks/bench_serve.py [--repository models --name demo] [--requests 400] [--rounds 3]
                                     [--out benchmarks/results/serve.json]

The server runs in its own process (as it would in production) on 127.0.0.1 with --workers 8; the in-process side
calls the same Engine from 8 threads. The two are measured in alternating rounds in one run. Goals: the server adds
at most 0.5 ms at p50 (concurrency 1) and reaches at least 85% of in-process throughput at concurrency 8.
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

GOAL_ADDED_P50_MS = 0.5
GOAL_THROUGHPUT_RATIO = 0.85


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


def start_server(repository: Path, workers: int, threads: int | None = None) -> tuple[subprocess.Popen, str]:
    extra = ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen([sys.executable, "-m", "ponder", "serve", "--repository", str(repository),
                             "--address", "127.0.0.1:0", "--metrics-port", "-1", "--workers", str(workers),
                             "--max-queue", "64", *extra], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    while True:
        line = lines.get(timeout=120)
        if "listening on 127.0.0.1:" in line:
            return proc, "127.0.0.1:" + line.split("listening on 127.0.0.1:")[1].split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--name", default="demo")
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement (default: 400)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--seq", type=int, default=64, help="prompt length in tokens (default: 64)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads per run, both sides (default: ORT's)")
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args(argv)

    import tritonclient.grpc as triton

    from ponder.data import embedded_corpus
    from ponder.serve.engine import Engine

    path = ensure_model(args.repository, args.name)
    engine = Engine(path, threads=args.threads, spinning=False)  # configured as the server configures its engines
    seq = min(args.seq, engine.max_seq_len)
    text = embedded_corpus().encode("utf-8")[1000:1000 + seq]
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)[None] % engine.vocab_size
    version = path.parent.name

    def local(index: int, setup: bool = False, state=None):
        if setup:
            return None
        return engine.infer(ids)

    proc, address = start_server(args.repository, workers=8, threads=args.threads)
    try:
        def remote(index: int, setup: bool = False, state=None):
            if setup:
                client = triton.InferenceServerClient(address)
                tensor = triton.InferInput("input_ids", list(ids.shape), "INT64")
                tensor.set_data_from_numpy(ids)
                return client, tensor
            client, tensor = state
            return client.infer(args.name, [tensor], model_version=version)

        # warm up both sides and check they agree
        check = remote(0, state=remote(0, setup=True))
        np.testing.assert_allclose(check.as_numpy("logits"), engine.infer(ids).logits, atol=1e-5)
        for call in (local, remote):
            drive(call, 8, 80)
        samples: dict[tuple[str, int], dict] = {}
        state = remote(0, setup=True)
        breakdown: dict[str, list[float]] = {"server_minus_compute_ms": [], "round_trip_minus_server_ms": [],
                                             "empty_rpc_ms": []}
        for round_index in range(args.rounds):
            # concurrency 1: one call each way in turn, so both see the same machine at the same moment
            for mode in ("in-process", "server"):
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
            # concurrency 8: the two sides in turn, each for the same number of requests
            for mode, call in (("in-process", local), ("server", remote)):
                latencies, seconds = drive(call, 8, args.requests)
                entry = samples.setdefault((mode, 8), {"latencies": [], "throughputs": []})
                entry["latencies"] += latencies
                entry["throughputs"].append(len(latencies) / seconds)
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(60)

    rows = []
    for (mode, concurrency), entry in samples.items():
        lat = entry["latencies"]
        # at concurrency 1 requests are back to back: throughput is 1 / mean latency
        rps = statistics.median(entry["throughputs"]) if entry["throughputs"] else 1e3 / statistics.mean(lat)
        rows.append({"mode": mode, "concurrency": concurrency, "requests": len(lat), "p50_ms": percentile(lat, 50),
                     "p99_ms": percentile(lat, 99), "throughput_rps": rps})
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    added_p50 = by[("server", 1)]["p50_ms"] - by[("in-process", 1)]["p50_ms"]
    ratio = by[("server", 8)]["throughput_rps"] / by[("in-process", 8)]["throughput_rps"]
    result = {
        "benchmark": "serve", "ponder_version": __version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "model": str(path), "seq": seq,
        "layers_executed": int(check.get_response().parameters["layers_executed"].int64_param),
        "n_layers": engine.n_layers, "threads": args.threads, "rows": rows,
        "where_the_time_goes_p50_ms": {k: statistics.median(v) for k, v in breakdown.items()},
        "server_added_p50_ms": added_p50, "goal_added_p50_ms": GOAL_ADDED_P50_MS,
        "throughput_ratio_c8": ratio, "goal_throughput_ratio": GOAL_THROUGHPUT_RATIO,
        "goals_met": {"added_p50": added_p50 <= GOAL_ADDED_P50_MS, "throughput_c8": ratio >= GOAL_THROUGHPUT_RATIO},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':11} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["mode"])):
        print(f"{r['mode']:11} {r['concurrency']:4d} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['throughput_rps']:8.1f}")
    parts = result["where_the_time_goes_p50_ms"]
    print(f"p50 of: server_ms - compute_ms {parts['server_minus_compute_ms']:.3f} ms; round trip - server_ms "
          f"{parts['round_trip_minus_server_ms']:.3f} ms; an empty RPC (ServerLive) {parts['empty_rpc_ms']:.3f} ms")
    print(f"server adds {added_p50:.3f} ms at p50 (goal <= {GOAL_ADDED_P50_MS}); throughput at concurrency 8 is "
          f"{ratio:.1%} of in-process (goal >= {GOAL_THROUGHPUT_RATIO:.0%}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
