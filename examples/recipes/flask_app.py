"""Flask under gunicorn, preloaded and threaded: one Client made at import, shared by every thread and fork.

    MODELPOOL_ENDPOINT=tcp://127.0.0.1:5555 MODELPOOL_MODEL=digits \
        gunicorn --preload --workers 2 --threads 8 -b 127.0.0.1:8080 flask_app:app
"""
import os

from flask import Flask, jsonify, request

from modelpool import Client, PoolError

ENDPOINT = os.environ.get("MODELPOOL_ENDPOINT", "tcp://127.0.0.1:5555")
MODEL = os.environ.get("MODELPOOL_MODEL", "digits")

app = Flask(__name__)
pool = Client(ENDPOINT, timeout=10)  # before the fork: each gunicorn worker gets its own sockets on first use


@app.post("/predict")
def predict():
    try:
        y = pool.predict(MODEL, request.get_json()["x"])  # lists of floats are fine
    except PoolError as exc:
        return jsonify(error=str(exc), type=type(exc).__name__), int(exc.status)
    return jsonify(y=y.tolist(), pid=os.getpid())
