"""Regenerate gateway/grpc_predict_v2_pb2.py and _pb2_grpc.py from gateway/grpc_predict_v2.proto.

The generated modules are checked in, so installing modelpool needs no protoc and every install runs
the same code. Generate with the grpcio-tools pinned in setup.cfg's `codegen` extra (the newest whose
protobuf is < 7, which tritonclient[grpc] requires): its gencode must not be newer than the protobuf
runtime installed beside it.

    .venv/bin/pip install -e '.[codegen]' && .venv/bin/python scripts/gen_grpc.py
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "gateway" / "grpc_predict_v2.proto"
# Laid out as the installed package, so that _pb2_grpc imports `modelpool.gateway.grpc_predict_v2_pb2`.
PACKAGE = Path("modelpool") / "gateway"


def main() -> int:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        out = Path(tmp) / "out"
        (src / PACKAGE).mkdir(parents=True)
        (out / PACKAGE).mkdir(parents=True)
        shutil.copy(PROTO, src / PACKAGE / PROTO.name)
        code = protoc.main(["grpc_tools.protoc", f"-I{src}", f"--python_out={out}", f"--grpc_python_out={out}",
                            str(PACKAGE / PROTO.name)])
        if code != 0:
            print(f"protoc failed with exit code {code}", file=sys.stderr)
            return 1
        for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py"):
            text = _adapt((out / PACKAGE / name).read_text())
            (PROTO.parent / name).write_text(text)
            print(f"wrote gateway/{name}")
    return 0


# tritonclient's grpc_service.proto defines the same `inference.*` names in protobuf's default pool, so
# ours goes into a pool of its own: both load in one process (a test, or a user's app) without the
# "duplicate symbol" error, and the wire format is the same.
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = ("# modelpool: a pool of its own, see scripts/gen_grpc.py\n"
             "POOL = _descriptor_pool.DescriptorPool()\n"
             "DESCRIPTOR = POOL.AddSerializedFile(")


def _adapt(text: str) -> str:
    """The two edits made to protoc's output: a private descriptor pool, no unused import."""
    if _DEFAULT_POOL in text:
        text = text.replace(_DEFAULT_POOL, _OWN_POOL)
    if "warnings." not in text:  # the stub imports `warnings` and never uses it (pyflakes)
        text = text.replace("import warnings\n", "")
    return text


if __name__ == "__main__":
    sys.exit(main())
