"""deploy/: the container image and the Kubernetes manifests agree with each other and with `ponder serve`.

Every manifest's command is parsed by ponder's own argument parser, so a renamed or removed flag fails here; its
ports, probes and metrics annotations must point at what that command listens on.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml  # PyYAML, there through optuna (a core dependency)

from ponder.cli import build_parser
from ponder.config import tomllib  # the standard library's, or tomli before Python 3.11

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

# Flags the manifests may use before `ponder serve` has them (none now). They are taken out before the command is
# parsed; a flag leaves this set when it lands, and the test parses it too.
PENDING: set[str] = set()

HEALTH = {"/v2/health/live", "/v2/health/ready"}  # what the HTTP front end answers for probes


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def entrypoint() -> list[str]:
    (line,) = [x for x in dockerfile().splitlines() if x.startswith("ENTRYPOINT ")]
    return json.loads(line.removeprefix("ENTRYPOINT "))


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) for every workload: a Deployment's template, an InferenceService's predictor."""
    specs = []
    for name, doc in documents():
        if doc["kind"] == "Deployment":
            specs.append((f"{name}: Deployment/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "InferenceService":
            specs.append((f"{name}: InferenceService/{doc['metadata']['name']}", doc["spec"]["predictor"]))
    return specs


def argv_of(container: dict) -> list[str]:
    """What the container runs: Kubernetes' command replaces the image's ENTRYPOINT, args are appended (no CMD)."""
    return [str(a) for a in (container.get("command") or entrypoint()) + container.get("args", [])]


def option(argv: list[str], flag: str) -> str | None:
    """The last value given to flag (argparse keeps the last), as `--flag V` or `--flag=V`."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def serve_flags() -> set[str]:
    """Every option string `ponder serve --help` lists."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {s for action in commands.choices["serve"]._actions for s in action.option_strings}


def parse_serve(argv: list[str], where: str):
    assert argv[:2] == ["ponder", "serve"], f"{where} runs {argv[:2]}, not ponder serve"
    # Spelled out in full: argparse would also take an abbreviation (--thread for --threads).
    unknown = {a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")} - serve_flags() - PENDING
    assert not unknown, f"{where} uses {sorted(unknown)}, which `ponder serve --help` does not list"
    rest, skip = [], False
    for a in argv[2:]:
        if skip:
            skip = False
        elif a in PENDING:
            skip = True
        elif a.split("=", 1)[0] not in PENDING:
            rest.append(a)
    try:
        return build_parser().parse_args(["serve", *rest])
    except SystemExit:
        pytest.fail(f"{where}: `ponder serve` refuses {rest} (see stderr)")


def ports_of(argv: list[str], where: str) -> dict[str, int]:
    args = parse_serve(argv, where)
    http = option(argv, "--http-port")
    return {"repository": args.repository, "grpc": int(args.address.rsplit(":", 1)[1]),
            "host": args.address.rsplit(":", 1)[0], "http": int(http) if http is not None else 8000,
            "metrics": args.metrics_port}


def test_the_manifests_parse_and_hold_what_docs_deploy_md_shows():
    kinds = sorted((name, d["kind"]) for name, d in documents())
    assert kinds == [("kserve-inferenceservice.yaml", "InferenceService"),
                     ("kubernetes.yaml", "Deployment"), ("kubernetes.yaml", "Service")]
    for name, d in documents():
        assert d["apiVersion"] and d["metadata"]["name"], name
    text = (ROOT / "docs" / "deploy.md").read_text()
    for path in DEPLOY.iterdir():
        if path.suffix in (".yaml", ".py") or path.name == "Dockerfile":
            assert f"deploy/{path.name}" in text, f"docs/deploy.md does not mention deploy/{path.name}"


def test_the_image_serves_the_repository_on_every_interface_as_a_user():
    argv = entrypoint()
    ports = ports_of(argv, "Dockerfile ENTRYPOINT")
    assert ports["host"] == "0.0.0.0", "inside a container the server must not bind 127.0.0.1 only"
    assert ports["repository"] == "/models"
    assert (ports["grpc"], ports["http"], ports["metrics"]) == (8001, 8000, 8002)
    exposed = {int(p) for line in dockerfile().splitlines() if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert exposed == {ports["grpc"], ports["http"], ports["metrics"]}
    (user,) = [x.split()[1] for x in dockerfile().splitlines() if x.startswith("USER ")]
    assert user.split(":")[0] not in ("root", "0")


def test_the_image_installs_the_serve_extra_and_not_torch():
    sys.path.insert(0, str(DEPLOY))
    try:
        import serve_requirements
    finally:
        sys.path.remove(str(DEPLOY))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = serve_requirements.requirements(pyproject)
    names = {serve_requirements.canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in wanted}
    assert "torch" not in names and not names & serve_requirements.LEFT_OUT
    extras = pyproject["project"]["optional-dependencies"]
    for requirement in extras["serve"] + extras["onnx"]:
        if not requirement.startswith("ponder"):
            assert requirement in wanted
    assert "serve_requirements.py" in dockerfile() and "pip install --no-deps ." in dockerfile()


def test_serving_imports_none_of_what_the_image_leaves_out():
    sys.path.insert(0, str(DEPLOY))
    try:
        from serve_requirements import LEFT_OUT
    finally:
        sys.path.remove(str(DEPLOY))
    code = ("import sys\n"
            "from ponder.cli import build_parser\n"
            "build_parser().parse_args(['serve', '--repository', 'x'])\n"
            "import ponder.serve.server, ponder.serve.commands, ponder.serve.engine, ponder.serve.repository\n"
            f"print(','.join(sorted(m for m in {sorted(LEFT_OUT)!r} if m in sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"serving imports {proc.stdout.strip()}, which the image does not install"


@pytest.mark.parametrize("where,pod", pod_specs(), ids=lambda x: x if isinstance(x, str) else None)
def test_ports_probes_and_the_repository_match_the_command(where, pod):
    (container,) = pod["containers"]
    argv = argv_of(container)
    ports = ports_of(argv, where)
    assert ports["host"] == "0.0.0.0"
    served = {ports["grpc"], ports["http"], ports["metrics"]}
    declared = {p["containerPort"] for p in container.get("ports", [])}
    assert declared and declared <= served, f"{where} declares ports {declared}, the server listens on {served}"
    probes = {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container}
    assert {"readinessProbe", "livenessProbe"} <= probes.keys()
    for kind, probe in probes.items():
        if "grpc" in probe:  # grpc.health.v1, registered on the gRPC port
            assert probe["grpc"]["port"] == ports["grpc"], f"{where} {kind}"
        else:
            assert probe["httpGet"]["port"] == ports["http"], f"{where} {kind}"
            assert probe["httpGet"]["path"] in HEALTH, f"{where} {kind}"
    if "httpGet" in probes["readinessProbe"]:
        assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert probes["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    if "STORAGE_URI" in env:  # KServe's storage initializer puts the repository at /mnt/models
        assert ports["repository"] == "/mnt/models"
    else:
        assert mounts[ports["repository"]].get("readOnly") is True, f"{where}: the repository is not mounted read-only"


def test_the_kserve_predictor_speaks_grpc_on_its_one_port_and_is_scraped_on_the_metrics_port():
    (isvc,) = [d for _, d in documents() if d["kind"] == "InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    ports = ports_of(argv_of(container), "InferenceService")
    (port,) = container["ports"]  # KServe exposes one port per predictor container
    assert (port["name"], port["containerPort"]) == ("h2c", ports["grpc"])
    notes = isvc["metadata"]["annotations"]
    assert notes["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert int(notes["prometheus.kserve.io/port"]) == ports["metrics"]
    assert notes["prometheus.kserve.io/path"] == "/metrics"
    # HTTP probes on a port other than the serving one work in Standard (raw) mode only; Knative rewrites their port.
    assert notes["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")


def test_the_service_reaches_the_deployment_on_the_ports_it_serves():
    (deployment,) = [d for _, d in documents() if d["kind"] == "Deployment"]
    (service,) = [d for _, d in documents() if d["kind"] == "Service"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = ports_of(argv_of(container), "Deployment")
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    targets = {p["name"]: by_name.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {"grpc": ports["grpc"], "http": ports["http"], "metrics": ports["metrics"]}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > parse_serve(argv_of(container), "Deployment").grace + 1


def test_pending_flags_are_used_and_only_they_are_skipped():
    used = {a.split("=", 1)[0] for _, pod in pod_specs() for a in argv_of(pod["containers"][0]) if a.startswith("--")}
    used |= {a for a in entrypoint() if a.startswith("--")}
    assert PENDING <= used, f"{PENDING - used} are no longer used: take them out of PENDING"
