"""A web app in front of aipod models: the request body streams into an
aipod call and the result payload streams back, never held whole in memory;
a long call can run in the background and be watched.

    pip install "aipod[client]" fastapi uvicorn
    AIPOD_TARGET=127.0.0.1:50051 uvicorn app:app --port 8000

Routes:

- ``POST /v1/{func}?k=v…`` — query parameters are the kwargs (JSON values
  when they parse as JSON, else strings), the body is the payload. The
  answer is the result payload (``application/octet-stream``, with the JSON
  result in the ``X-Aipod-Result`` header) or, when the model returned no
  payload, the JSON result itself.
- ``POST /jobs/{func}?k=v…`` — starts the call in the background; answers
  ``{"job": ID}`` at once (202).
- ``GET /jobs/{id}`` — the job's progress (phase, fraction, message,
  elapsed) while it runs, then its result or error.

Errors from the model come back with an HTTP status that matches the gRPC
code (404 unknown function, 400 bad arguments, 503 unavailable, …) and a
JSON body ``{"code", "message", "call_id"}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aipod import AsyncClient, CallError, Progress

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 409, "NOT_FOUND": 404,
    "UNIMPLEMENTED": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499, "DATA_LOSS": 502,
}
PIPE_DEPTH = 4  # result payload chunks buffered between the call and the HTTP response


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.aipod = AsyncClient(os.environ.get("AIPOD_TARGET", "127.0.0.1:50051"))
    app.state.jobs = {}
    yield
    await app.state.aipod.close()


app = FastAPI(title="aipod web example", lifespan=lifespan)


def kwargs_of(request: Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in request.query_params.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def error_response(e: CallError) -> JSONResponse:
    return JSONResponse(
        {"code": e.code, "message": e.message, "call_id": e.call_id, "phase": e.phase},
        status_code=HTTP_STATUS.get(e.code, 500),
    )


class Pipe:
    """The result payload from the call (written in an executor thread) to
    the HTTP response (read in the event loop), bounded: a slow HTTP client
    slows the call's download instead of filling memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(PIPE_DEPTH)

    def write(self, data: bytes) -> int:
        asyncio.run_coroutine_threadsafe(self.queue.put(bytes(data)), self.loop).result()
        return len(data)

    async def chunks(self, call: asyncio.Task[Any]) -> AsyncIterator[bytes]:
        while True:
            getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({getter, call}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            while not self.queue.empty():  # what arrived before the call ended
                chunk = self.queue.get_nowait()
                if chunk:
                    yield chunk
            call.result()  # a failure mid-payload ends the response early
            return


@app.post("/v1/{func}")
async def call(func: str, request: Request) -> Response:
    loop = asyncio.get_running_loop()
    pipe = Pipe(loop)
    announced: asyncio.Future[tuple[Any, int | None]] = loop.create_future()

    def on_result(value: Any, size: int | None) -> None:
        loop.call_soon_threadsafe(lambda: announced.done() or announced.set_result((value, size)))

    task = asyncio.ensure_future(
        request.app.state.aipod.call(func, kwargs_of(request), data=request.stream(), out=pipe, on_result=on_result)
    )
    await asyncio.wait({announced, task}, return_when=asyncio.FIRST_COMPLETED)
    if not announced.done():
        try:
            task.result()
        except CallError as e:
            return error_response(e)
    value, size = announced.result()
    if size is None:
        result = await task
        return JSONResponse(result.value)
    headers = {"X-Aipod-Result": json.dumps(value, separators=(",", ":")), "Content-Length": str(size)}
    return StreamingResponse(pipe.chunks(task), media_type="application/octet-stream", headers=headers)


@app.post("/jobs/{func}", status_code=202)
async def start_job(func: str, request: Request) -> dict[str, str]:
    body = await request.body()  # background jobs keep their (small) input
    job_id = uuid.uuid4().hex
    job: dict[str, Any] = {"state": "running", "progress": None}
    request.app.state.jobs[job_id] = job

    def progress(p: Progress) -> None:
        job["progress"] = {
            "phase": p.phase, "fraction": p.fraction, "message": p.message,
            "elapsed": round(p.elapsed, 3), "queue_position": p.queue_position,
        }

    async def run() -> None:
        try:
            res = await request.app.state.aipod.call(func, kwargs_of(request), data=body, progress=progress)
            job.update(state="done", result=res.value)
        except CallError as e:
            job.update(state="failed", error={"code": e.code, "message": e.message})

    job["task"] = asyncio.ensure_future(run())
    return {"job": job_id}


@app.get("/jobs/{job_id}")
async def job_status(job_id: str, request: Request) -> Response:
    job = request.app.state.jobs.get(job_id)
    if job is None:
        return JSONResponse({"code": "NOT_FOUND", "message": f"no job {job_id}"}, status_code=404)
    return JSONResponse({k: v for k, v in job.items() if k != "task"})
