"""``ponder bench``: what early exit buys, per threshold, on your own model.

For every batch size and threshold the benchmark measures request latency (p50/p95/p99), throughput, the layers
executed, the mean token depth and the perplexity on the bench text; and the speed-up against full depth (threshold
1.0, always measured) next to the ideal ones: ``n_layers / layers_executed``, what the speed-up would be if a request
cost exactly the layers it ran, and per token ``n_layers / mean_token_depth``, the bound for a compacting export
(each layer computes its running tokens only). It runs in process on ONNX Runtime, or through a gRPC server: one at
``--address``, or one it starts itself on 127.0.0.1 for the model's repository and stops afterwards.

Thresholds are interleaved (call by call at concurrency 1, in alternating blocks above it), so a noisy machine
disturbs every threshold alike and the ratios stay fair.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ponder.errors import ConfigError, PonderError
from ponder.limits import BENCH_THRESHOLDS, THRESHOLD_RANGE, check_threshold
from ponder.model_repository import Target as Target  # re-exported: which model a command names lives there now
from ponder.model_repository import model_file as model_file
from ponder.model_repository import resolve_target as resolve_target
from ponder.model_repository import versions
from ponder.plots import plot_bench
from ponder.plots import text_line as text_line  # re-exported: the line under a bench table or plot lives there now
from ponder.text import embedded_validation_text

FULL_DEPTH = 1.0
EMBEDDED_TEXT = "the embedded corpus' validation split (Python's pydoc documentation)"


# -- what to measure ------------------------------------------------------------------------------------------------

versions_in = versions  # the versions of a model folder that hold a model file (its old name here)

@dataclass
class Sample:
    """One request: its latency, its depth, and (scored after the timed block) how well it predicted the next
    tokens."""

    ms: float
    layers: int
    mean_depth: float
    compute_ms: float
    logits: np.ndarray | None  # dropped once scored
    targets: np.ndarray | None
    nll: float = 0.0  # summed over the batch's tokens
    tokens: int = 0

    def score(self) -> None:
        if self.logits is not None and self.targets is not None:
            self.nll, self.tokens = _nll(self.logits, self.targets), self.targets.size
            self.logits = self.targets = None


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float((log_z - picked).sum())


class InProcess:
    """The model on ONNX Runtime in this process. Thread-safe (ONNX Runtime sessions are)."""

    via = "inprocess"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from ponder.serve.engine import Engine

        self.engine = Engine(path, threads=threads)
        self.n_layers, self.max_seq_len = self.engine.n_layers, self.engine.max_seq_len
        self.byte_level = self.engine.byte_level

    def __call__(self, ids: np.ndarray, targets: np.ndarray, threshold: float) -> Sample:
        start = time.perf_counter()
        r = self.engine.infer(ids, threshold)
        ms = (time.perf_counter() - start) * 1e3
        return Sample(ms, r.layers_executed, r.mean_token_depth, r.compute_ms, r.logits, targets)

    def close(self) -> None:
        pass


class Remote:
    """The model behind an Open Inference Protocol v2 server; latency is the client's round trip."""

    via = "grpc"

    def __init__(self, address: str, name: str, version: str = "", *, tls_ca: str | Path | None = None,
                 timeout: float = 60.0) -> None:
        from ponder.serve.client import Client

        self.client = Client(address, tls_ca=tls_ca, timeout=timeout)
        self.name, self.version = name, version
        try:
            if not self.client.model_ready(name, version):
                raise PonderError(f"the server at {address} has model {name!r} but it is not ready")
            config = self.client.model_config(name, version)
        except Exception:
            self.client.close()
            raise
        self.n_layers, self.max_seq_len = int(config["n_layers"]), int(config["max_seq_len"])
        self.byte_level = config.get("tokenizer") == "byte"

    def __call__(self, ids: np.ndarray, targets: np.ndarray, threshold: float) -> Sample:
        reply = self.client.infer(self.name, ids, threshold=threshold, version=self.version)
        return Sample(reply.round_trip_ms, reply.layers_executed, float(reply.params["mean_token_depth"]),
                      float(reply.params["compute_ms"]), reply.outputs["logits"], targets)

    def close(self) -> None:
        self.client.close()


# -- a server of our own, for --via grpc without --address ---------------------------------------------------------

_LISTENING = re.compile(r"listening on (\S+):(\d+) ")


@contextlib.contextmanager
def served(repository: Path, *, workers: int = 1, threads: int | None = None,
           start_timeout: float = 180.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """``ponder serve`` on ``repository`` in a child process, on 127.0.0.1 and a free port. Yields its address and
    the process; on exit sends SIGTERM (the server drains and exits 0) and waits, killing it only if it hangs."""
    cmd = [sys.executable, "-m", "ponder", "serve", "--repository", str(repository), "--address", "127.0.0.1:0",
           "--metrics-port", "-1", "--http-port", "-1", "--workers", str(workers), "--grace", "5"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def pump() -> None:  # keeps reading after start-up, so the server never blocks on a full pipe
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise PonderError(f"the server did not start within {start_timeout:.0f} s:\n"
                                  + "".join(log[-10:])) from None
            if line is None:
                raise PonderError(f"the server exited with status {proc.wait()} before listening:\n"
                                  + "".join(log[-10:]))
            if match := _LISTENING.search(line):
                break
        yield f"127.0.0.1:{match.group(2)}", proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM, then wait; SIGKILL only if it is still there after ``timeout`` seconds. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


# -- the measurement --------------------------------------------------------------------------------------------

@dataclass
class Settings:
    thresholds: Sequence[float] = BENCH_THRESHOLDS
    batch_sizes: Sequence[int] = (1, 8)
    concurrency: int = 1
    requests: int = 50
    warmup: int = 5
    seq_len: int | None = None  # default: the model's context
    text: str | None = None     # default: the validation part of the embedded corpus
    text_name: str = ""         # what ``text`` is, for the report (e.g. the file it came from)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        for t in self.thresholds:
            try:
                check_threshold(t, "--thresholds")
            except ConfigError:
                raise ConfigError(f"--thresholds: {t!r} is outside {THRESHOLD_RANGE}") from None
        if not self.thresholds:
            raise PonderError("--thresholds: give at least one")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise PonderError(f"--batch-sizes must be whole numbers >= 1, got {list(self.batch_sizes)}")
        for name in ("concurrency", "requests"):
            if getattr(self, name) < 1:
                raise PonderError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise PonderError(f"--warmup must be >= 0, got {self.warmup}")


def bench_text() -> str:
    """The default bench text: the validation part of the embedded corpus (what the demo model never trained on)."""
    return embedded_validation_text()


def sequences(runner: Any, text: str, seq_len: int, tokenizer: Any = None) -> np.ndarray:
    """The text as rows of ``seq_len + 1`` token ids: inputs are ``row[:-1]``, targets ``row[1:]``."""
    if runner.byte_level:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    elif tokenizer is not None:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    else:
        raise PonderError("this model uses a word vocabulary; give its local model.onnx (with the config.json "
                          "beside it) so that its tokenizer can be read")
    return cut_rows(ids, seq_len, "the bench text", "; give a longer --text-file or a smaller --seq-len")


def cut_rows(ids: np.ndarray, seq_len: int, what: str, hint: str = "") -> np.ndarray:
    """Token ids as rows of ``seq_len + 1`` (the remainder dropped); an error naming ``what`` if not one fits."""
    rows = len(ids) // (seq_len + 1)
    if rows < 1:
        raise PonderError(f"{what} has {len(ids)} tokens, fewer than one sequence of {seq_len + 1}{hint}")
    return np.asarray(ids[: rows * (seq_len + 1)], dtype=np.int64).reshape(rows, seq_len + 1)


def measure(runner: Callable[[np.ndarray, np.ndarray, float], Sample], n_layers: int, rows: np.ndarray,
            settings: Settings, progress: bool = True) -> list[dict[str, Any]]:
    """Run the schedule and summarise it: one row per (batch size, threshold), full depth included."""
    from tqdm import tqdm

    thresholds = sorted(set(map(float, settings.thresholds)) | {FULL_DEPTH})
    n, c = settings.requests, settings.concurrency
    total = len(set(settings.batch_sizes)) * len(thresholds) * (n + settings.warmup)
    block = 1 if c == 1 else max(4 * c, -(-n // 5))
    out: list[dict[str, Any]] = []
    with ThreadPoolExecutor(c) as pool, tqdm(total=total, desc="bench", unit="req", disable=not progress,
                                             file=sys.stderr, leave=False) as bar:
        def run(b: int, indices: range, t: float) -> list[Sample]:
            """Requests ``indices`` at batch size ``b``: request i takes rows i*b .. i*b+b-1 (wrapping), so every
            threshold sees the same sequences. Built per request, so --requests does not cost memory."""
            def one(i: int) -> Sample:
                picks = np.arange(i * b, (i + 1) * b) % len(rows)
                return runner(rows[picks, :-1], rows[picks, 1:], t)

            return [one(i) for i in indices] if c == 1 else list(pool.map(one, indices))

        for b in dict.fromkeys(settings.batch_sizes):  # each batch size once, in the order given
            warm = range(settings.warmup)
            for t in thresholds:
                run(b, warm, t)
                bar.update(len(warm))
            samples: dict[float, list[Sample]] = {t: [] for t in thresholds}
            wall = dict.fromkeys(thresholds, 0.0)
            for r, lo in enumerate(range(0, n, block)):
                k = r % len(thresholds)
                for t in thresholds[k:] + thresholds[:k]:
                    start = time.perf_counter()
                    done = run(b, range(lo, min(lo + block, n)), t)
                    wall[t] += time.perf_counter() - start
                    for sample in done:  # the perplexity maths stays out of the timed block
                        sample.score()
                    samples[t] += done
                    bar.update(len(done))
            rows_b = [_summary(t, b, samples[t], wall[t], n_layers, rows.shape[1] - 1) for t in thresholds]
            full = next(row for row in rows_b if row["threshold"] == FULL_DEPTH)
            for row in rows_b:
                row["speedup"] = full["p50_ms"] / row["p50_ms"]
                row["throughput_speedup"] = row["throughput_rps"] / full["throughput_rps"]
            out += rows_b
    return out


def _summary(t: float, batch: int, samples: list[Sample], wall: float, n_layers: int, seq_len: int) -> dict:
    ms = np.array([s.ms for s in samples])
    layers = float(np.mean([s.layers for s in samples]))
    depth = float(np.mean([s.mean_depth for s in samples]))
    nll, tokens = sum(s.nll for s in samples), sum(s.tokens for s in samples)
    return {
        "threshold": t, "batch_size": batch, "requests": len(samples),
        "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
        "compute_p50_ms": float(np.median([s.compute_ms for s in samples])),
        "throughput_rps": len(samples) / wall, "tokens_per_s": len(samples) * batch * seq_len / wall,
        "layers_executed": layers, "mean_token_depth": depth, "perplexity": math.exp(min(nll / tokens, 50.0)),
        "ideal_speedup": n_layers / layers, "token_ideal_speedup": n_layers / depth,
    }


def run_bench(target: Target, settings: Settings, *, via: str | None = None, address: str | None = None,
              tls_ca: str | Path | None = None, threads: int | None = None, progress: bool = True,
              log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> dict[str, Any]:
    """Measure ``target``; returns the report (settings, machine, one row per batch size and threshold)."""
    settings.check()
    via = via or ("grpc" if address else "inprocess")
    if via not in ("inprocess", "grpc"):
        raise PonderError(f"--via must be inprocess or grpc, got {via!r}")
    if tls_ca is not None and not address:
        raise PonderError("--tls-ca is for connecting to a server at --address")
    if threads is not None and address:
        raise PonderError("--threads sets ONNX Runtime's threads here or in the server ponder bench starts; the "
                          "server at --address chose its own")
    if via == "inprocess":
        if address:
            raise PonderError("--address is for --via grpc")
        if target.path is None:
            raise PonderError(f"{target.name!r} is no file or folder here; in process, give a model.onnx, a model "
                              "folder or a repository")
        return _measure(InProcess(target.path, threads), target, settings, progress, None)
    if address:
        return _measure(Remote(address, target.name, target.version, tls_ca=tls_ca), target, settings, progress,
                        address)
    if target.repository is None:
        raise PonderError(f"--via grpc without --address serves the model itself, which needs it in a repository "
                          f"(ROOT/NAME/VERSION/model.onnx, as `ponder export --repository` writes); "
                          f"{str(target.path or target.name)!r} is not in one")
    with served(target.repository, workers=settings.concurrency, threads=threads) as (addr, proc):
        log(f"started `ponder serve --repository {target.repository}` on {addr} (pid {proc.pid})")
        report = _measure(Remote(addr, target.name, target.version), target, settings, progress, addr)
    log(f"stopped the server (pid {proc.pid}, exit status {proc.returncode})")
    report["server_exit_status"] = proc.returncode
    return report


def _measure(runner: Any, target: Target, settings: Settings, progress: bool, address: str | None) -> dict:
    try:
        seq_len = runner.max_seq_len if settings.seq_len is None else settings.seq_len
        if not 2 <= seq_len <= runner.max_seq_len:
            raise PonderError(f"--seq-len must be in [2, {runner.max_seq_len}] (the model's context), got {seq_len}")
        tokenizer = None
        if not runner.byte_level and target.path is not None:
            from ponder.serve.engine import Engine

            tokenizer = runner.engine.tokenizer if isinstance(runner, InProcess) else Engine(target.path).tokenizer
        rows = sequences(runner, settings.text if settings.text is not None else bench_text(), seq_len, tokenizer)
        results = measure(runner, runner.n_layers, rows, settings, progress)
    finally:
        runner.close()
    return {
        "model": target.name, "version": target.version, "path": str(target.path) if target.path else None,
        "via": runner.via, "address": address, "n_layers": runner.n_layers, "seq_len": seq_len,
        "sequences": len(rows), "text": _text_name(settings), "concurrency": settings.concurrency,
        "requests": settings.requests, "warmup": settings.warmup, "machine": machine(), "rows": results,
        **settings.extra,
    }


def _text_name(settings: Settings) -> str:
    if settings.text is None:
        return EMBEDDED_TEXT
    return settings.text_name or f"the given text ({len(settings.text):,} characters)"


def machine() -> dict[str, Any]:
    import onnxruntime

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


# -- reporting ------------------------------------------------------------------------------------------------------

COLUMNS = {  # key: (heading, format)
    "batch_size": ("batch", "{:d}"), "threshold": ("threshold", "{:g}"),
    "layers_executed": ("layers executed", "{:.2f}"), "mean_token_depth": ("mean token depth", "{:.2f}"),
    "p50_ms": ("p50 ms", "{:.2f}"), "p95_ms": ("p95 ms", "{:.2f}"), "p99_ms": ("p99 ms", "{:.2f}"),
    "throughput_rps": ("req/s", "{:.0f}"), "speedup": ("speed-up", "{:.2f}x"),
    "ideal_speedup": ("ideal", "{:.2f}x"), "token_ideal_speedup": ("per token", "{:.2f}x"),
    "perplexity": ("perplexity", "{:.3f}"),
}
BENCH_COLUMNS = ("batch_size", "threshold", "p50_ms", "p95_ms", "p99_ms", "throughput_rps", "layers_executed",
                 "mean_token_depth", "speedup", "ideal_speedup", "token_ideal_speedup", "perplexity")


def format_table(rows: list[dict[str, Any]], columns: Sequence[str] = BENCH_COLUMNS) -> str:
    cells = [[COLUMNS[c][0] for c in columns]] + [[COLUMNS[c][1].format(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path, stem: str = "bench", title: str = "") -> list[Path]:
    """``out_dir/STEM.json`` and ``out_dir/STEM.png``, each written beside and renamed into place."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PonderError(f"cannot create {str(out)!r}: {exc.strerror or exc}") from None
    paths = [out / f"{stem}.json", out / f"{stem}.png"]
    tmp_json, tmp_png = (p.with_name(f".{p.stem}.tmp{p.suffix}") for p in paths)
    try:
        tmp_json.write_text(json.dumps(report, indent=2) + "\n")
        plot_bench(report, tmp_png, title=title)
        os.replace(tmp_json, paths[0])
        os.replace(tmp_png, paths[1])
    except OSError as exc:
        raise PonderError(f"cannot write the report into {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        tmp_json.unlink(missing_ok=True)
        tmp_png.unlink(missing_ok=True)
    return paths
