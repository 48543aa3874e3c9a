"""FastAPI (asyncio): one AsyncClient for the app; thousands of requests in flight on one socket.

    MODELPOOL_ENDPOINT=tcp://127.0.0.1:5555 MODELPOOL_MODEL=digits \
        uvicorn fastapi_app:app --port 8080
"""
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from modelpool import AsyncClient, PoolError

ENDPOINT = os.environ.get("MODELPOOL_ENDPOINT", "tcp://127.0.0.1:5555")
MODEL = os.environ.get("MODELPOOL_MODEL", "digits")
pool = AsyncClient(ENDPOINT, timeout=10)


@asynccontextmanager
async def lifespan(app):
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


class Rows(BaseModel):
    x: list[list[float]]


@app.post("/predict")
async def predict(body: Rows):
    try:
        y = await pool.predict(MODEL, body.x)
    except PoolError as exc:
        raise HTTPException(int(exc.status), f"{type(exc).__name__}: {exc}") from None
    return {"y": y.tolist(), "pid": os.getpid()}
