"""The FastAPI app of magi-serve: the OpenAI Videos API, the live mp4 stream, the WebSocket session, the page.

    app = create_app(pipe, server_cfg)          # pipe: a MagiPipeline; server_cfg: ServerConfig (or ServeConfig)
    uvicorn.run(app, host=..., port=...)

Routes (the wire protocol: docs in the README's server section):
    POST   /v1/videos                      create (multipart or JSON; MAGI fields as extra body fields)
    GET    /v1/videos                      list (limit, after, order)
    GET    /v1/videos/{id}                 retrieve
    DELETE /v1/videos/{id}                 cancel if queued / running, delete its files
    GET    /v1/videos/{id}/content         the mp4 (variant=video); stream=true: the fragmented mp4 as it is made
    POST   /v1/videos/extensions           continue a completed video (by id, or an uploaded video)
    POST   /v1/videos/{id}/remix           the same request with a new prompt
    WS     /v1/videos/live                 live session (magi_infer/server/session.py)
    GET    /  and  /static/*               the web page (magi_infer/server/static)
    GET    /health                         liveness (no key needed)
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from magi_infer.server.errors import ApiError, bad_request, not_found
from magi_infer.server.jobs import JobStore, QueueFull, ShuttingDown, valid_id
from magi_infer.server.params import Context, Upload, normalize_form, parse_create, parse_extend

logger = logging.getLogger("magi_infer.server")
STATIC = Path(__file__).resolve().parent / "static"
STREAM_PIECE = 1 << 16  # bytes per read when a finished file is streamed


def create_app(pipe, cfg) -> FastAPI:
    """The app serving `pipe` (one engine, jobs one at a time) under server config `cfg`."""
    import asyncio
    from contextlib import asynccontextmanager

    server_cfg = getattr(cfg, "server", cfg)
    from magi_infer.server.runner import supports_prefix_latents

    model_name = server_cfg.model_name or pipe.config.model.name
    followers = pipe.parallel is not None and pipe.parallel.world_size > 1
    store = JobStore(pipe, server_cfg, model_name, followers=followers)
    ctx = Context(server_cfg, pipe.config, model_name, supports_prefix_latents(pipe))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store.start()
        try:
            yield
        finally:
            await asyncio.to_thread(store.shutdown, server_cfg.shutdown_grace_s)

    app = FastAPI(title="magi-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.ctx, app.state.cfg = store, ctx, server_cfg

    # ------------------------------------------------------------------ errors, auth
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) or None
        return JSONResponse(bad_request(f"{param}: {first.get('msg', 'invalid')}", param=param).body(), 400)

    def authorize(request: Request) -> None:
        if server_cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        # A plain link (the web page's <a href> to a video, a <video src>) cannot send a header: ?api_key= too.
        key = key or request.query_params.get("api_key", "")
        if not (key and hmac.compare_digest(key.encode(), str(server_cfg.api_key).encode())):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` (or ?api_key=KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def job_or_404(video_id: str):
        job = store.get(video_id)  # ids are checked against video_<32 hex> before any lookup or path
        if job is None:
            raise not_found(video_id)
        return job

    def queue(spec, inputs, **kw):
        try:
            return store.add(spec, inputs, **kw)
        except QueueFull:
            raise ApiError(429, f"the queue is full (server.max_queue={server_cfg.max_queue} jobs waiting); "
                                "retry later", code="queue_full", headers={"Retry-After": "5"}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down and takes no new jobs", code="server_shutting_down") \
                from None

    async def body_of(request: Request) -> Dict[str, Any]:
        limit = int(server_cfg.max_upload_mb * 2**20)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 2**20:
            raise ApiError(413, f"request body of {int(length)} bytes exceeds server.max_upload_mb="
                                f"{server_cfg.max_upload_mb:g}", code="payload_too_large")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise bad_request("the body is not valid JSON", code="invalid_json") from None
            if not isinstance(body, dict):
                raise bad_request("the body must be a JSON object", code="invalid_json")
            return body
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            from starlette.datastructures import UploadFile

            try:
                form = await request.form(max_files=4, max_fields=1000)
            except Exception as e:  # noqa: BLE001 - starlette's MultiPartException and parser errors
                raise bad_request(f"cannot parse the form: {e}", code="invalid_form") from None
            items = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read(limit + 1)
                    if len(data) > limit:
                        raise ApiError(413, f"{key}: the upload exceeds server.max_upload_mb="
                                            f"{server_cfg.max_upload_mb:g}", param=key, code="payload_too_large")
                    value = Upload(value.filename or "", data)
                items.append((key, value))
            return normalize_form(items)
        raise bad_request(f"Content-Type {kind or '(none)'!r}: send multipart/form-data or application/json",
                          code="unsupported_media_type")

    # ------------------------------------------------------------------ the Videos API
    @app.get("/health")
    async def health():
        return {"status": "ok" if store.accepting else "shutting_down", "model": model_name,
                "size": store.size, "fps": store.fps}

    @app.get("/v1/magi/info")
    async def info(request: Request):
        """What a client needs to fill a request form: the served size, chunk length, defaults and limits."""
        authorize(request)
        c = pipe.config
        return {"model": model_name, "chunk_frames": pipe.chunk_frames, "fps": c.video.fps, "width": c.video.width,
                "height": c.video.height, "num_steps": c.sampler.num_steps, "max_frames": server_cfg.max_frames,
                "max_steps": server_cfg.max_steps, "auth": server_cfg.api_key is not None}

    @app.post("/v1/videos")
    async def create(request: Request):
        authorize(request)
        spec, inputs = parse_create(await body_of(request), ctx)
        return queue(spec, inputs).to_object()

    @app.get("/v1/videos")
    async def list_videos(request: Request, limit: int = 20, after: Optional[str] = None, order: str = "desc"):
        authorize(request)
        if not 1 <= limit <= 100:
            raise bad_request(f"limit={limit} must lie in [1, 100]", param="limit")
        if order not in ("asc", "desc"):
            raise bad_request(f"order={order!r} is not asc or desc", param="order")
        jobs = store.list()
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise bad_request(f"after={after!r} is not a listed video id", param="after")
            jobs = jobs[ids.index(after) + 1:]
        page = jobs[:limit]
        return {"object": "list", "data": [j.to_object() for j in page],
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                "has_more": len(jobs) > limit}

    @app.get("/v1/videos/{video_id}")
    async def retrieve(request: Request, video_id: str):
        authorize(request)
        return job_or_404(video_id).to_object()

    @app.delete("/v1/videos/{video_id}")
    async def delete(request: Request, video_id: str):
        authorize(request)
        job = job_or_404(video_id)
        store.delete(job)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/videos/{video_id}/content")
    async def content(request: Request, video_id: str, variant: str = "video", stream: bool = False):
        authorize(request)
        job = job_or_404(video_id)
        if variant != "video":
            known = variant in ("thumbnail", "spritesheet")
            raise bad_request(f"variant={variant!r} is {'not made by this server' if known else 'unknown'}: only "
                              "variant=video", param="variant", code="unsupported" if known else "invalid_value")
        feed = job.feed  # taken before the status: see JobStore._release_feed
        if stream and feed is not None:
            return StreamingResponse(_follow_bytes(feed), media_type="video/mp4",
                                     headers={"Cache-Control": "no-store"})
        if job.status != "completed":
            if job.status == "failed":
                raise ApiError(409, f"video {job.id} failed ({job.error['code']}): {job.error['message']}",
                               param="video_id", code="video_failed")
            raise ApiError(409, f"video {job.id} is {job.status}: its content exists once completed (or stream it "
                                "with ?stream=true)", param="video_id", code="video_not_ready")
        path = _inside(store.root, job.video_path)
        if stream:
            return StreamingResponse(_file_bytes(path), media_type="video/mp4")
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")

    @app.post("/v1/videos/extensions")
    async def extend(request: Request):
        authorize(request)
        spec, source_id, upload = parse_extend(await body_of(request), ctx)
        inputs: Dict[str, bytes] = {}
        # An uploaded copy of one of our completed videos is that video (the openai client's extend() uploads).
        source = store.find_video(upload.data) if upload is not None else None
        if source_id is not None:
            source = store.get(source_id) if valid_id(source_id) else None
            if source is None:
                raise not_found(source_id)
            if source.status != "completed":
                raise ApiError(409, f"video {source_id} is {source.status}: only a completed video can be extended",
                               param="video", code="video_not_ready")
        if source is not None and ctx.prefix_latents and source.latents_path.is_file():
            # Its clean latents: an exact continuation, no VAE encode (vae.kind=preview has no encoder).
            inputs["prefix_latents"] = _inside(store.root, source.latents_path).read_bytes()
        elif not ctx.can_encode:
            raise bad_request("extending an uploaded video needs a VAE encoder, and this server runs "
                              "vae.kind=preview (decode only): extend one of its own videos (video={\"id\": ...} "
                              "or its mp4), or start it with vae.kind=vit vae.dir=PATH", param="video",
                              code="unsupported")
        elif source is not None:
            inputs["prefix_video.mp4"] = _inside(store.root, source.video_path).read_bytes()
        else:
            from os.path import splitext

            inputs["prefix_video" + (splitext(upload.filename)[1].lower() or ".mp4")] = upload.data
        return queue(spec, inputs, extended_from=source.id if source is not None else None).to_object()

    @app.post("/v1/videos/{video_id}/remix")
    async def remix(request: Request, video_id: str):
        authorize(request)
        source = job_or_404(video_id)
        body = await body_of(request)
        allowed = ("prompt", "prompts", "seed", "num_steps")
        for key in body:
            if key not in allowed:
                raise bad_request(f"unknown field {key!r}: a remix takes {', '.join(allowed)}", param=key,
                                  code="unknown_parameter")
        from magi_infer.server.params import _num_steps, _prompts, _seed

        prompt, prompts = _prompts(body, ctx, required=True)
        spec = dict(source.spec, prompt=prompt, prompts=prompts, live=False)
        if "seed" in body:
            spec["seed"] = _seed(body)
        if "num_steps" in body:
            spec["num_steps"] = _num_steps(body, ctx)
        return queue(spec, {}, remixed_from=source.id, copy_inputs_from=source,
                     extended_from=source.extended_from).to_object()

    # ------------------------------------------------------------------ live session, page
    @app.websocket("/v1/videos/live")
    async def live(ws: WebSocket):
        from magi_infer.server.session import live_session

        await live_session(ws, store, ctx)

    if server_cfg.static and (STATIC / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    return app


def _inside(root: Path, path: Path) -> Path:
    """`path`, resolved, if it lies under `root` (ids are validated already; this is the second lock)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ApiError(404, "not found", code="not_found")
    return resolved


async def _follow_bytes(feed):
    async for item in feed.follow():
        if isinstance(item, bytes):
            yield item


async def _file_bytes(path: Path):
    import anyio

    async with await anyio.open_file(path, "rb") as f:
        while piece := await f.read(STREAM_PIECE):
            yield piece
