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
            text = (out / PACKAGE / name).read_text()
            # the stub imports `warnings` and never uses it; drop it so pyflakes stays quiet
            text = text.replace("import warnings\n", "") if "warnings." not in text else text
            (PROTO.parent / name).write_text(text)
            print(f"wrote gateway/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
