"""The WebSocket live session (`/v1/videos/live`): one t2v job whose prompt the client changes while it runs.

client -> {"type": "create", "prompt", "prompts"?, "num_frames"?, "seconds"?, "seed"?, "num_steps"?}
server -> {"type": "created", "video"}; then, in order, the fragmented mp4 as binary messages (concatenated they
          are the file, the first begins with the init segment) interleaved with {"type": "progress"},
          {"type": "chunk"} (after the chunk's frames went to the muxer: its bytes are sent, except the last
          frame's fragment, which the muxer closes when the next frame arrives) and {"type": "prompt_applied"};
          finally {"type": "done", "video"} or {"type": "error", "error", "video"?}, and the socket closes.
client -> {"type": "prompt", "prompt"} any time: server -> {"type": "prompt_accepted"} at once (or
          {"type": "prompt_rejected", "error"}), {"type": "prompt_applied", "chunk", "prompt"} once it conditions
          a chunk; {"type": "cancel"}: the job stops after its current sampler step.
A client that goes away cancels its job (nobody watches it any more); the job stays listed in GET /v1/videos.
Auth: `Authorization: Bearer KEY` or `?api_key=KEY` (browsers cannot set headers on a WebSocket).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from magi_infer.server.errors import ApiError
from magi_infer.server.jobs import QueueFull, ShuttingDown
from magi_infer.server.params import parse_live

logger = logging.getLogger("magi_infer.server")


def _authorized(ws: WebSocket, key) -> bool:
    if key is None:
        return True
    header = ws.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ws.query_params.get("api_key", "")
    return bool(given) and hmac.compare_digest(given.encode(), str(key).encode())


async def live_session(ws: WebSocket, store, ctx) -> None:
    await ws.accept()
    send_lock = asyncio.Lock()

    async def send_json(message: dict) -> None:
        async with send_lock:
            await ws.send_json(message)

    async def fail(code: str, message: str, close_code: int = 1000, **extra) -> None:
        try:
            await send_json({"type": "error", "error": {"code": code, "message": message}, **extra})
            await ws.close(close_code)
        except (WebSocketDisconnect, RuntimeError):
            pass

    if not _authorized(ws, ctx.server.api_key):
        await fail("invalid_api_key", "missing or wrong API key: ?api_key=KEY or Authorization: Bearer KEY", 1008)
        return
    try:
        first = await ws.receive_json()
    except (WebSocketDisconnect, ValueError, KeyError):
        await fail("invalid_message", "the first message must be JSON {\"type\": \"create\", ...}")
        return
    if not isinstance(first, dict) or first.get("type") != "create":
        await fail("invalid_message", "the first message must be {\"type\": \"create\", \"prompt\": ...}")
        return
    from magi_infer.live import LivePrompts

    try:
        spec, inputs = parse_live(first, ctx)
        live = LivePrompts()
        try:
            job = store.add(spec, inputs, live=live)
        except QueueFull:
            raise ApiError(429, f"the queue is full (server.max_queue={ctx.server.max_queue} jobs waiting); "
                                "retry later", code="queue_full") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down and takes no new jobs",
                           code="server_shutting_down") from None
    except ApiError as e:
        await fail(e.code or "invalid_request", e.message, param=e.param)
        return
    feed = job.feed
    await send_json({"type": "created", "video": job.to_object()})

    async def relay() -> None:
        async for item in feed.follow():
            if isinstance(item, bytes):
                async with send_lock:
                    await ws.send_bytes(item)
            else:
                await send_json(item)

    async def listen() -> None:
        while True:
            try:
                message = await ws.receive_json()
            except ValueError:
                await send_json({"type": "error", "error": {"code": "invalid_message",
                                                            "message": "messages must be JSON objects"}})
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "prompt":
                prompt = message.get("prompt")
                problem = None
                if not isinstance(prompt, str) or not prompt.strip():
                    problem = "prompt must be a non-empty string"
                elif len(prompt) > ctx.server.max_prompt_chars:
                    problem = (f"prompt has {len(prompt)} characters, more than this server's limit "
                               f"server.max_prompt_chars={ctx.server.max_prompt_chars}")
                if problem:
                    await send_json({"type": "prompt_rejected", "prompt": prompt,
                                     "error": {"code": "invalid_value", "message": problem}})
                    continue
                live.set(prompt)
                await send_json({"type": "prompt_accepted", "prompt": prompt})
            elif kind == "cancel":
                store.cancel(job, "cancelled")
            else:
                await send_json({"type": "error", "error": {"code": "invalid_message",
                                                            "message": f"unknown message type {kind!r}"}})

    relaying = asyncio.ensure_future(relay())
    listening = asyncio.ensure_future(listen())
    try:
        await asyncio.wait({relaying, listening}, return_when=asyncio.FIRST_COMPLETED)
        if listening.done() and not relaying.done():  # the client left (or its socket failed): stop the job
            store.cancel(job, "cancelled")
            relaying.cancel()
            return
        relaying.result()  # a failed send: the client is gone
        video = job.to_object()
        if job.status == "completed":
            await send_json({"type": "done", "video": video})
        else:
            await send_json({"type": "error", "error": job.error or {"code": "failed", "message": job.status},
                             "video": video})
        await ws.close()
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        store.cancel(job, "cancelled")
    finally:
        for task in (relaying, listening):
            task.cancel()
