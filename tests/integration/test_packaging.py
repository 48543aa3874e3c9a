"""What `pip install` puts in site-packages: one import name, `modelpool`, and nothing generic beside it."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from poolutil import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# A user's app with modules named like ours used to shadow them: `from client import Client` got theirs.
USER_APP = {
    "client.py": "raise SystemExit('the user's own client.py was imported instead of modelpool')\n",
    "broker.py": "raise SystemExit('the user's own broker.py was imported instead of modelpool')\n",
}
CHECK = """
import logging, modelpool, modelpool.client.protocol as p
from modelpool import AsyncClient, Client, InvalidInput, PoolError, RequestTimeout
from modelpool.broker.config import PoolConfig
from modelpool.modelproc.worker import main
from modelpool.broker.gateway import GatewaySupervisor  # the launcher side needs no server packages
assert p.CLIENT == b"MDPC01"
assert logging.getLogger("modelpool.client.sync").name.startswith("modelpool.")
print("ok", modelpool.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=240)
    (found,) = out.glob("modelpool-*.whl")
    return found


def test_the_wheel_installs_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = sorted({name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))})
    assert top == ["modelpool"], top
    assert "modelpool/client/protocol.py" in names and "modelpool/modelproc/demo/digits.keras" in names
    # the KServe V2 gateway with its checked-in generated gRPC code and the .proto it comes from
    assert {"modelpool/gateway/process.py", "modelpool/gateway/grpc_predict_v2_pb2.py",
            "modelpool/gateway/grpc_predict_v2_pb2_grpc.py", "modelpool/gateway/grpc_predict_v2.proto"} <= set(names)
    assert not any(name.startswith("modelpool/scripts/") or "/tests/" in name for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        assert "modelpool = modelpool.cli:main" in zf.read(entry_points).decode()


def test_a_fresh_venv_imports_modelpool_beside_the_users_own_client_module(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    py = env_dir / "bin" / "python"
    # the wheel into the fresh venv; its light dependencies (numpy, pyzmq, msgpack) come from this
    # interpreter's site-packages through a .pth, so the test needs no network
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    deps = {Path(m.__file__).resolve().parents[1] for m in (__import__("numpy"), __import__("zmq"), __import__("msgpack"))}
    (site / "deps.pth").write_text("\n".join(str(d) for d in sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=240)
    app = tmp_path / "app"
    app.mkdir()
    for name, text in USER_APP.items():
        (app / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(py), "-c", CHECK], cwd=app, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok ") and str(site) in done.stdout
    for command in ([str(env_dir / "bin" / "modelpool"), "--help"], [str(py), "-m", "modelpool", "--help"]):
        shown = subprocess.run(command, cwd=app, env=env, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert "serve" in shown.stdout and "worker" in shown.stdout
    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__")
    assert installed == ["modelpool"], installed
