"""Generate ponder's gRPC stubs from protos/ into serve/ (run by `make protos`).

The stubs are checked in, marked DO NOT EDIT, and a test regenerates them to show they are not stale.
Two changes to protoc's output, both applied here so that regenerating reproduces them exactly:

- Messages go into a private descriptor pool (``inference_pb2.POOL``). The protocol fixes the package name
  ``inference``, which tritonclient's stubs also use; in protobuf's default pool the two would collide
  ("duplicate symbol") and ponder could not share a process with tritonclient.
- A header names the source and the command.

Usage: python protos/generate.py [--out DIR]   (needs grpcio-tools, pinned in the dev extra)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SOURCE = "ponder/serve/inference.proto"
HEADER = f"# DO NOT EDIT: made by `make protos` (protos/generate.py) from protos/{SOURCE}.\n"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = (
    "# A private pool: the protocol's package name `inference` is also tritonclient's (see protos/generate.py).\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def generate(out: Path) -> list[Path]:
    """Run protoc on the sources and write the finished stubs into ``out``; returns the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={tmp}",
               f"--grpc_python_out={tmp}", str(PROTOS / SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"protoc failed:\n{done.stderr}")
        made = Path(tmp) / Path(SOURCE).parent
        written = []
        out.mkdir(parents=True, exist_ok=True)
        for src in sorted(made.glob("*.py")):
            text = src.read_text()
            if src.name.endswith("_pb2.py"):
                if text.count(DEFAULT_POOL) != 1:
                    raise SystemExit(f"{src.name}: protoc's output changed; cannot move it to a private pool")
                text = text.replace(DEFAULT_POOL, PRIVATE_POOL)
            target = out / src.name
            target.write_text(HEADER + text)
            written.append(target)
        return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "serve", help="where the stubs go (default: serve/)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
