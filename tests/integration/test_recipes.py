"""The README's recipes, run for real: Flask under gunicorn --preload, Celery prefork, FastAPI under uvicorn.

Each is the story modelpool exists for: a Client made at import time, before the server forks its
workers, used from many threads or forked processes at once.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from poolutil import REPO, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RECIPES = REPO / "examples" / "recipes"
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(pool, *paths: Path) -> dict:
    path = os.pathsep.join([*(str(p) for p in paths), str(RECIPES), str(REPO)])
    return dict(os.environ, MODELPOOL_ENDPOINT=pool.endpoint, MODELPOOL_MODEL="a", PYTHONPATH=path)


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _serve(cmd: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=RECIPES, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def listening() -> bool:
        assert proc.poll() is None, log.read_text()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 60.0, what=f"{cmd[2]} listening")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _check_http_recipe(url: str, pool, models) -> set[int]:
    rng = np.random.default_rng(41)
    xs = [rng.normal(size=(2, 8)) for _ in range(32)]
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda x: _post(url, {"x": x.tolist()}), xs))
    for x, (status, body) in zip(xs, answers):
        assert status == 200, body
        want = np.asarray(models.keras["a"](x.astype("float32"), training=False))
        np.testing.assert_allclose(np.array(body["y"]), want, **TOL)
    status, body = _post(url, {"x": [[1.0, 2.0]]})  # wrong width: the pool's 400 reaches the caller
    assert status == 400 and "expected shape" in json.dumps(body), body
    return {body["pid"] for _, body in answers}


def test_flask_under_gunicorn_preload_with_threads(pool, models, tmp_path):
    port = _free_port()
    proc = _serve([sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--threads", "4",
                   "-b", f"127.0.0.1:{port}", "flask_app:app"], _env(pool), port, tmp_path / "gunicorn.log")
    try:
        pids = _check_http_recipe(f"http://127.0.0.1:{port}/predict", pool, models)
        assert proc.pid not in pids  # answered by forked workers, on the Client the master made at import
    finally:
        _stop(proc)


def test_fastapi_under_uvicorn_with_async_client(pool, models, tmp_path):
    port = _free_port()
    proc = _serve([sys.executable, "-m", "uvicorn", "fastapi_app:app", "--host", "127.0.0.1", "--port", str(port)],
                  _env(pool), port, tmp_path / "uvicorn.log")
    try:
        _check_http_recipe(f"http://127.0.0.1:{port}/predict", pool, models)
    finally:
        _stop(proc)


def test_celery_prefork_with_a_client_made_at_import(pool, models, tmp_path):
    queue, results = tmp_path / "queue", tmp_path / "results"
    queue.mkdir()
    results.mkdir()
    # The recipe as written, on Celery's file-system transport (no Redis here); the app is the recipe's.
    (tmp_path / "celery_here.py").write_text(
        "from celery_tasks import app, predict\n"
        f"folder = {str(queue)!r}\n"
        "app.conf.broker_url = 'filesystem://'\n"
        "app.conf.broker_transport_options = {'data_folder_in': folder, 'data_folder_out': folder}\n"
        f"app.conf.result_backend = 'file://{results}'\n")
    env = _env(pool, tmp_path)
    log = tmp_path / "celery.log"
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "celery_here", "worker", "--pool", "prefork",
                               "--concurrency", "2", "--loglevel", "INFO", "--without-heartbeat",
                               "--without-mingle", "--without-gossip"],
                              cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    rng = np.random.default_rng(43)
    xs = [rng.normal(size=(1, 8)) for _ in range(12)]
    script = (
        "import json, sys\n"
        "from celery_here import predict\n"
        "xs = json.loads(sys.stdin.read())\n"
        "pending = [predict.delay(x) for x in xs]\n"
        "print(json.dumps([p.get(timeout=90) for p in pending]))\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], input=json.dumps([x.tolist() for x in xs]),
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert done.returncode == 0, done.stderr + log.read_text()
        answers = json.loads(done.stdout)
    finally:
        _stop(worker)
    for x, answer in zip(xs, answers):
        want = np.asarray(models.keras["a"](x.astype("float32"), training=False))
        np.testing.assert_allclose(np.array(answer["y"]), want, **TOL)
    assert worker.pid not in {a["pid"] for a in answers}  # ran in the forked pool processes


def test_readme_shows_each_recipe_as_it_is_tested():
    readme = (REPO / "README.md").read_text()
    for name in ("flask_app.py", "celery_tasks.py", "fastapi_app.py"):
        body = (RECIPES / name).read_text()
        code = body.split('"""', 2)[2].strip()  # the file without its docstring
        assert code in readme, f"README's copy of examples/recipes/{name} differs from the tested file"
