"""``ponder serve`` and ``ponder client``: argument parsing and printing; the work is in server.py and client.py."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from ponder.errors import PonderError
from ponder.generation import add_sampling_arguments, sampling_from_args
from ponder.limits import BENCH_THRESHOLDS, MAX_MESSAGE_MB


def whole_number(low: int, high: int | None = None, why: str = "") -> Any:
    """An argparse ``type`` for a whole number in [low, high]: a value outside is refused when parsed, naming it."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}{why}")
        return value
    return parse


def seconds(*, zero_ok: bool) -> Any:
    """An argparse ``type`` for a finite number of seconds, > 0 (or >= 0 with ``zero_ok``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds {'>=' if zero_ok else '>'} 0, "
                                             f"got {text!r}")
        return value
    return parse


def add_parsers(commands: Any) -> None:
    sv = commands.add_parser(
        "serve", help="serve exported models over gRPC (Open Inference Protocol v2)",
        description="Serve every model in a Triton-style repository (ROOT/NAME/VERSION/model.onnx) over gRPC, "
                    "speaking the Open Inference Protocol v2, so tritonclient[grpc] works unchanged. Each response "
                    "carries layers_executed, mean_token_depth, compute_ms, queue_ms and server_ms; a request may "
                    "set act_threshold. SIGTERM drains in-flight requests within --grace seconds, then exits 0.")
    sv.add_argument("--repository", required=True, metavar="ROOT", help="the model repository")
    sv.add_argument("--address", default="127.0.0.1:8001", help="HOST:PORT to listen on (default: 127.0.0.1:8001; "
                                                                  "port 0 picks a free one)")
    sv.add_argument("--http-port", type=int, default=8000,
                    help="the same protocol over HTTP/REST on this port, same host (default: 8000, as Triton; 0 picks "
                         "one; -1 turns it off)")
    sv.add_argument("--metrics-port", type=int, default=8002,
                    help="Prometheus /metrics on this port, same host (default: 8002; 0 picks one; -1 turns it off)")
    sv.add_argument("--tls-cert", type=Path, metavar="F", help="serve TLS with this PEM certificate (needs --tls-key)")
    sv.add_argument("--tls-key", type=Path, metavar="F", help="the certificate's PEM private key")
    sv.add_argument("--tls-ca", type=Path, metavar="F", help="require client certificates signed by this PEM CA")
    grpc_limit = (f" (gRPC counts message sizes in a signed 32-bit number of bytes, so {MAX_MESSAGE_MB} MiB is the "
                  "most it takes)")
    sv.add_argument("--max-message-mb", type=whole_number(1, MAX_MESSAGE_MB, grpc_limit), default=64, metavar="N",
                    help=f"largest request or response in MiB, 1 to {MAX_MESSAGE_MB} (default: 64)")
    sv.add_argument("--workers", type=int, default=2, metavar="N",
                    help="runs of one model computing at once, each a batch of requests (default: 2)")
    sv.add_argument("--max-queue", type=int, default=64, metavar="N",
                    help="requests waiting per model; more get RESOURCE_EXHAUSTED (default: 64)")
    sv.add_argument("--max-batch-size", type=whole_number(1), default=32, metavar="N",
                    help="rows one run holds (requests batched together, or generations advancing together); a "
                         "request with more rows is refused (default: 32)")
    sv.add_argument("--max-queue-delay-us", type=whole_number(0), default=0, metavar="US",
                    help="microseconds a request may wait for its batch to fill (default: 0, never wait)")
    sv.add_argument("--max-batch-tokens", type=whole_number(2), default=16384, metavar="N",
                    help="tokens (batch x sequence) one request, or one run, may hold (default: 16384)")
    sv.add_argument("--max-tokens", type=whole_number(1), default=1024, metavar="N",
                    help="tokens one generation may ask for (default: 1024)")
    sv.add_argument("--threads", type=whole_number(1), metavar="N",
                    help="ONNX Runtime threads per model run (default: ORT's)")
    sv.add_argument("--model-control-mode", choices=["none", "explicit", "poll"], default="none",
                    help="as Triton: none (every model at start), explicit (--load-model ones at start, then "
                         "RepositoryModelLoad/Unload), poll (every model, then the repository re-read every "
                         "--repository-poll-secs) (default: none)")
    sv.add_argument("--repository-poll-secs", type=seconds(zero_ok=False), default=15.0, metavar="S",
                    help="how often poll mode re-reads the repository (default: 15)")
    sv.add_argument("--load-model", action="append", default=[], metavar="NAME",
                    help="with --model-control-mode explicit: a model to load at start (repeatable)")
    sv.add_argument("--grace", type=seconds(zero_ok=True), default=10.0, metavar="S",
                    help="seconds in-flight requests get to finish on SIGTERM (default: 10)")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="log verbosity on stderr (default: info)")
    sv.set_defaults(handler=_serve)

    cl = commands.add_parser(
        "client", help="talk to a running ponder server: health, metadata, infer, generate",
        description="A client for `ponder serve` (or any Open Inference Protocol v2 server) that prints the layers "
                    "executed and the latency of every request.")
    cl.add_argument("--address", default="127.0.0.1:8001", help="the server's HOST:PORT (default: 127.0.0.1:8001)")
    cl.add_argument("--tls-ca", type=Path, metavar="F", help="connect with TLS, trusting this PEM CA certificate")
    cl.add_argument("--timeout", type=seconds(zero_ok=False), default=30.0, metavar="S",
                    help="deadline per call (default: 30 s)")
    actions = cl.add_subparsers(dest="client_command", metavar="ACTION")

    he = actions.add_parser("health", help="is the server live and ready; which models are ready",
                            description="Server liveness and readiness, and the state of every model version.")
    he.add_argument("--json", action="store_true", help="print JSON")
    he.set_defaults(handler=_health)

    me = actions.add_parser("metadata", help="the server's and models' metadata",
                            description="Server metadata, and each model's inputs and outputs.")
    me.add_argument("--model", help="only this model (default: every ready one)")
    me.add_argument("--json", action="store_true", help="print JSON")
    me.set_defaults(handler=_metadata)

    inf = actions.add_parser("infer", help="one forward pass: next token, layers executed, latency",
                             description="Send one ModelInfer request (token ids, or text turned into byte ids) "
                                         "and print the predicted next token, the layers executed and the latency.")
    source = inf.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text for a byte-level model (sent as its UTF-8 bytes as token ids); for a "
                                       "word-level model give --ids, from `ponder tokenize MODEL_OR_RUN --text ...`")
    source.add_argument("--ids", help="token ids separated by spaces or commas")
    _model_flags(inf)
    inf.add_argument("--typed", action="store_true", help="send typed contents instead of raw bytes")
    inf.set_defaults(handler=_infer)

    ge = actions.add_parser("generate", help="stream generated text, one token per response",
                            description="Generation through the model's KV cache over ModelStreamInfer (inputs "
                                        "text_input, stream, sampling_parameters, as Triton's LLM backends take "
                                        "them): prints each token as it arrives with its depth, layers executed and "
                                        "latency, then a summary. Greedy unless --temperature is above 0.")
    ge.add_argument("text", help="the prompt")
    add_sampling_arguments(ge, "--max-new-tokens")
    _model_flags(ge)
    ge.set_defaults(handler=_generate)
    cl.set_defaults(handler=lambda args: _usage(cl))

    add_bench_parser(commands)


def add_bench_parser(commands: Any) -> None:
    be = commands.add_parser(
        "bench", help="adaptive-depth latency per threshold: in process or through a gRPC server",
        description="Measure what early exit buys on an exported model: p50/p95/p99 latency, throughput, layers "
                    "executed, mean token depth and perplexity per threshold and batch size, with the speed-up "
                    "against full depth (threshold 1.0, always measured) next to the ideal n_layers / layers "
                    "executed. Writes DIR/bench.json and DIR/bench.png and prints a table. With --via grpc and no "
                    "--address it starts `ponder serve` on 127.0.0.1 for the model's repository and stops it after.")
    be.add_argument("target", metavar="MODEL_OR_REPOSITORY",
                    help="a model.onnx, a version or model folder, a repository (ROOT/NAME/VERSION/model.onnx), or "
                         "with --address a model name the server serves")
    be.add_argument("--model", help="which model of a repository that holds several")
    be.add_argument("--via", choices=["inprocess", "grpc"],
                    help="in this process on ONNX Runtime, or through a gRPC server (default: grpc when --address "
                         "is given, else inprocess)")
    be.add_argument("--address", help="HOST:PORT of a running server (implies --via grpc)")
    be.add_argument("--tls-ca", type=Path, metavar="F", help="connect to --address with TLS, trusting this PEM CA")
    be.add_argument("--thresholds", "-t", type=float, nargs="+", default=list(BENCH_THRESHOLDS), metavar="T",
                    help="act_threshold values in (0, 1] (default: %(default)s; 1.0 is always added)")
    be.add_argument("--batch-sizes", "-b", type=int, nargs="+", default=[1, 8], metavar="B",
                    help="sequences per request (default: 1 8)")
    be.add_argument("--concurrency", "-c", type=int, default=1, metavar="N",
                    help="requests in flight at once (default: 1)")
    be.add_argument("--requests", "-n", type=int, default=50, metavar="N",
                    help="timed requests per threshold and batch size (default: 50)")
    be.add_argument("--warmup", type=int, default=5, metavar="N",
                    help="untimed requests first, per threshold and batch size (default: 5)")
    be.add_argument("--seq-len", type=int, metavar="N", help="tokens per sequence (default: the model's context)")
    be.add_argument("--text-file", type=Path, metavar="F",
                    help="UTF-8 text to cut into sequences (default: the embedded corpus' validation part)")
    be.add_argument("--threads", type=whole_number(1), metavar="N",
                    help="ONNX Runtime threads per run (default: ORT's)")
    be.add_argument("--out", type=Path, default=Path("bench"), metavar="DIR",
                    help="where bench.json and bench.png go (default: ./bench)")
    be.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    be.add_argument("--no-progress", action="store_true", help="no progress bar")
    be.set_defaults(handler=_bench)


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name (default: the only ready model)")
    parser.add_argument("--model-version", default="", help="model version (default: the newest)")
    parser.add_argument("--threshold", "-t", type=float, help="act_threshold in (0, 1] (default: the model's)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _bench(args: argparse.Namespace) -> int:
    from ponder.serve.bench import Settings, format_table, resolve_target, run_bench, text_line, write_report

    text = None
    if args.text_file is not None:
        try:
            text = args.text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PonderError(f"--text-file {str(args.text_file)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    settings = Settings(thresholds=args.thresholds, batch_sizes=args.batch_sizes, concurrency=args.concurrency,
                        requests=args.requests, warmup=args.warmup, seq_len=args.seq_len, text=text,
                        text_name=str(args.text_file) if args.text_file else "")
    settings.check()
    target = resolve_target(args.target, args.model)
    report = run_bench(target, settings, via=args.via, address=args.address, tls_ca=args.tls_ca,
                       threads=args.threads, progress=not args.no_progress)
    paths = write_report(report, args.out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['model']} via {report['via']}: {report['n_layers']} layers, {report['sequences']} sequences "
              f"of {report['seq_len']} tokens, concurrency {report['concurrency']}, {report['requests']} requests "
              "per row; speed-up = p50 at threshold 1 / p50, ideal = n_layers / layers executed, "
              "per token = n_layers / mean token depth")
        print(format_table(report["rows"]))
        print(text_line(report))
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ponder.serve.server import TLSFiles, serve

    if (args.tls_cert is None) != (args.tls_key is None):
        raise PonderError("--tls-cert and --tls-key go together")
    if args.tls_ca is not None and args.tls_cert is None:
        raise PonderError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    if args.grace < 0:
        raise PonderError(f"--grace must be >= 0 seconds, got {args.grace}")
    if not -1 <= args.http_port <= 65535:
        raise PonderError(f"--http-port must be a port (0 picks one, -1 turns HTTP off), got {args.http_port}")
    if not -1 <= args.metrics_port <= 65535:
        raise PonderError(f"--metrics-port must be a port (0 picks one, -1 turns metrics off), got {args.metrics_port}")
    logging.basicConfig(level=args.log_level.upper(), format="ponder serve: %(levelname)s %(message)s",
                        stream=sys.stderr)
    tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    return serve(args.repository, args.address, grace=args.grace, workers=args.workers, max_queue=args.max_queue,
                 max_message_mb=args.max_message_mb, tls=tls, threads=args.threads,
                 max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                 max_batch_tokens=args.max_batch_tokens, max_tokens=args.max_tokens,
                 http_port=None if args.http_port < 0 else args.http_port,
                 model_control_mode=args.model_control_mode, repository_poll_secs=args.repository_poll_secs,
                 load_models=tuple(args.load_model),
                 metrics_port=None if args.metrics_port < 0 else args.metrics_port)


def _client(args: argparse.Namespace) -> Any:
    from ponder.serve.client import Client

    return Client(args.address, tls_ca=args.tls_ca, timeout=args.timeout)


def _health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        live, ready = client.live(), client.ready()
        models = [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                  for m in client.index()]
    if args.json:
        print(json.dumps({"live": live, "ready": ready, "models": models}, indent=2))
    else:
        print(f"{args.address}: live {live}, ready {ready}")
        for m in models:
            print(f"  {m['name']}/{m['version']}: {m['state']}" + (f" ({m['reason']})" if m["reason"] else ""))
    return 0 if live and ready else 1


def _metadata(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        server = MessageToDict(client.server_metadata())
        names = [args.model] if args.model else sorted({m.name for m in client.index() if m.state == "READY"})
        models = [MessageToDict(client.model_metadata(name)) for name in names]
    if args.json:
        print(json.dumps({"server": server, "models": models}, indent=2))
        return 0
    print(f"server {server.get('name')} {server.get('version')}; extensions: {', '.join(server.get('extensions', []))}")
    for m in models:
        print(f"model {m['name']} (versions {', '.join(m.get('versions', []))}, {m.get('platform')})")
        for kind in ("inputs", "outputs"):
            for t in m.get(kind, []):
                shape = ", ".join(str(d) for d in t.get("shape", []))
                print(f"  {kind[:-1]:6} {t['name']}: {t['datatype']} [{shape}]")
    return 0


def _infer(args: argparse.Namespace) -> int:
    import numpy as np

    if args.text is None:
        try:
            ids = [int(x) for x in args.ids.replace(",", " ").split()]
        except ValueError:
            raise PonderError(f"--ids must be whole numbers separated by spaces or commas, got {args.ids!r}") from None
    with _client(args) as client:
        model = args.model or client.default_model()
        if args.text is not None:  # a word-level model is refused: its vocabulary is on the server
            ids = client.text_ids(model, args.text, args.model_version)
        reply = client.infer(model, np.array([ids], dtype=np.int64), threshold=args.threshold,
                             version=args.model_version, typed=args.typed)
    next_id = int(reply.outputs["logits"][0, -1].argmax())
    if args.json:
        print(json.dumps({"model": reply.model, "version": reply.version, "next_token_id": next_id,
                          "token_depth": reply.outputs["token_depth"].tolist(), "parameters": reply.params,
                          "round_trip_ms": reply.round_trip_ms}, indent=2))
        return 0
    shown = f" {bytes([next_id]).decode('utf-8', 'replace')!r}" if args.text is not None else ""
    p = reply.params
    print(f"{reply.model}/{reply.version}: next token{shown} (id {next_id}); layers executed {p['layers_executed']}, "
          f"mean token depth {p['mean_token_depth']:.2f}; compute {p['compute_ms']:.2f} ms, queue {p['queue_ms']:.2f} "
          f"ms, server {p['server_ms']:.2f} ms, round trip {reply.round_trip_ms:.2f} ms")
    return 0


def _generate(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    if not args.text:
        raise PonderError("the prompt is empty")
    with _client(args) as client:
        model = args.model or client.default_model()
        if not args.json:
            print(f"{model}: {args.text!r} ->", flush=True)
        tokens: list[dict[str, Any]] = []
        final: dict[str, Any] = {}
        for reply in client.generate(model, args.text, sampling=sampling, threshold=args.threshold,
                                     version=args.model_version):
            data = bytes(reply.outputs["text_output"][0])
            tokens.append({"token_id": int(reply.outputs["token_ids"][0]), "text": data.decode("utf-8", "replace"),
                           "bytes": data, "token_depth": int(reply.outputs["token_depth"][0]),
                           "layers_executed": reply.layers_executed, "compute_ms": reply.params["compute_ms"],
                           "server_ms": reply.params["server_ms"], "arrival_ms": reply.round_trip_ms})
            final = reply.params
            if not args.json:
                t = tokens[-1]
                print(f"  {t['text']!r:8} depth {t['token_depth']:2d}  layers {t['layers_executed']:2d}  compute "
                      f"{t['compute_ms']:6.2f} ms  arrived after {t['arrival_ms']:6.2f} ms", flush=True)
    text = b"".join(t.pop("bytes") for t in tokens).decode("utf-8", "replace")
    depths = [t["token_depth"] for t in tokens]
    reason = final.get("finish_reason", "length")
    if args.json:
        print(json.dumps({"model": model, "prompt": args.text, "text": text, "finish_reason": reason,
                          "tokens": tokens}, indent=2))
        return 0
    print(f"{args.text}\u2192{text}")
    print(f"{len(tokens)} tokens ({reason}); depth per token: mean {sum(depths) / len(depths):.2f}, min "
          f"{min(depths)}, max {max(depths)}")
    return 0
