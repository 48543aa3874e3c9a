"""Celery with its default prefork pool: the Client is made at import, before Celery forks its workers.

    MODELPOOL_ENDPOINT=tcp://127.0.0.1:5555 MODELPOOL_MODEL=digits \
        celery -A celery_tasks worker --pool prefork --concurrency 4
"""
import os

from celery import Celery

from modelpool import Client

ENDPOINT = os.environ.get("MODELPOOL_ENDPOINT", "tcp://127.0.0.1:5555")
MODEL = os.environ.get("MODELPOOL_MODEL", "digits")

app = Celery("tasks", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
             backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1"))
pool = Client(ENDPOINT, timeout=10)  # a forked child gets a fresh context and socket on first use


@app.task
def predict(x):
    return {"y": pool.predict(MODEL, x).tolist(), "pid": os.getpid()}
