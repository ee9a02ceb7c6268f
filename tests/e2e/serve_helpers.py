"""Test helpers for magi-serve: the real app served by uvicorn on a free port of 127.0.0.1 in a thread of the
test process (so that the test holds the pipeline), and the committed trained tiny model to serve."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
# The tiny preset after experiment=tiny's 400 steps, released layout (its README): loads in a second.
TINY = REPO / "tests" / "fixtures" / "tiny_base"


@contextmanager
def serving(pipe, output_root: Path, start_timeout: float = 60, **server_fields) -> Iterator[str]:
    """`create_app(pipe, ServerConfig(...))` under uvicorn on 127.0.0.1, port 0; yields its base URL and stops it
    (the app's own shutdown: queued jobs cancelled, the running one given server.shutdown_grace_s) afterwards."""
    import uvicorn

    from magi_infer.server.app import create_app
    from magi_infer.server.config import ServerConfig

    cfg = ServerConfig(host="127.0.0.1", port=0, output_root=str(output_root), **server_fields)
    app = create_app(pipe, cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                           ws="websockets-sansio", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not (server.started and server.servers):
        if not thread.is_alive():
            raise RuntimeError("uvicorn stopped before it was serving (its error is in the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"uvicorn was not serving after {start_timeout} s")
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=cfg.shutdown_grace_s + 30)
