"""magi-serve end to end: a real uvicorn server on 127.0.0.1 around a real pipeline (the trained tiny model of
tests/fixtures/tiny_base), driven by the official `openai` client, httpx and the `websockets` client.

* create (extra_body MAGI fields) / retrieve / list / download_content: the mp4 is the one the pipeline itself
  writes for the same request, byte for byte; delete cancels (queued and running); extend continues a finished
  video from its cached latents (by id, or by uploading its mp4); remix; i2v is refused naming vae.kind (the
  tiny model's preview VAE has no encoder).
* the queue is bounded (429), requests are limited (400 naming the server.* key), the key is required (401),
  ids are checked (path traversal gives 404, nothing outside output_root is read).
* ?stream=true sends the bytes of the file as they are made, from the start even to a reader that comes late.
* the WebSocket session: a prompt sent once chunk 0 is announced conditions a later chunk (prompt_applied), and
  the video is byte for byte the one of the static prompt list [p0, ..., p0, new, ...] run.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from magi_train.data.video_io import probe_video, read_video

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_base"
KEY = "test-key"
STEPS = 4
TIMEOUT = 120  # hang guard only


@pytest.fixture(scope="module")
def pipe():
    from magi_infer import MagiPipeline

    torch.set_num_threads(1)
    # window_size 1: a chunk starts denoising once the previous one is clean, so a live prompt sent after chunk 0
    # is announced can still reach a later chunk.
    return MagiPipeline.from_pretrained(TINY, overrides={"progress": False, "sampler.window_size": 1})


@contextmanager
def serving(pipe, root: Path, **server):
    import uvicorn

    from magi_infer.server.app import create_app
    from magi_infer.server.config import ServerConfig

    cfg = ServerConfig(**{"port": 0, "output_root": str(root), "api_key": KEY, **server})
    app = create_app(pipe, cfg)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                        timeout_graceful_shutdown=2, ws="websockets-sansio"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app.state.store
    finally:
        srv.should_exit = True
        thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    with serving(pipe, tmp_path_factory.mktemp("serve"), max_queue=1, max_frames=200, max_steps=8) as s:
        yield s


@pytest.fixture
def client(server):
    from openai import OpenAI

    warnings.simplefilter("ignore", DeprecationWarning)  # the client marks the Videos API deprecated
    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def wait(client, video_id: str):
    deadline = time.monotonic() + TIMEOUT
    while True:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed"):
            return video
        assert time.monotonic() < deadline, f"{video_id} still {video.status}"
        time.sleep(0.1)


def reference_mp4(pipe, tmp_path: Path, name: str, prompts, **kw) -> bytes:
    """The mp4 the pipeline itself writes for the request (same encoder settings as the server)."""
    out = tmp_path / f"{name}.mp4"
    pipe(prompts, output=out, **kw)
    return out.read_bytes()


def test_create_retrieve_list_download_equal_the_pipelines_own_video(client, pipe, server, tmp_path):
    prompts = ["a red blob moves right", "a blue blob moves down"]
    video = client.videos.create(prompt=prompts[0], extra_body={"prompts": prompts, "num_frames": 30,
                                                                "num_steps": STEPS, "seed": 3})
    assert video.id.startswith("video_") and video.status in ("queued", "in_progress")
    assert (video.model, video.size, video.object) == ("tiny", "64x64", "video")
    done = wait(client, video.id)
    assert done.status == "completed" and done.progress == 100 and done.error is None
    assert done.seconds == "1.25" and done.completed_at >= done.created_at  # 30 frames at 24 fps
    assert done.model_extra["prompts"] == prompts and done.model_extra["num_chunks"] == 2
    assert video.id in [v.id for v in client.videos.list(limit=100).data]
    data = client.videos.download_content(video.id).read()
    saved = tmp_path / "got.mp4"
    saved.write_bytes(data)
    info = probe_video(saved)
    assert (info.frames, info.width, info.height, info.codec) == (30, 64, 64, "h264")
    assert data == reference_mp4(pipe, tmp_path, "ref", prompts, num_frames=30, num_steps=STEPS, seed=3)
    # Everything the server keeps of the job is under its own directory of output_root.
    root = server[1].root
    assert sorted(p.name for p in (root / video.id).iterdir()) == ["inputs", "latents.safetensors", "video.mp4"]


def test_list_pages_with_after_and_order(client):
    ids = [client.videos.create(prompt=f"a red blob {i}", extra_body={"num_frames": 8, "num_steps": STEPS}).id
           for i in range(2)]
    for i in ids:
        wait(client, i)
    first = client.videos.list(limit=1, order="asc")
    assert len(first.data) == 1 and first.has_more
    newest = client.videos.list(limit=2)  # desc: newest first
    assert [v.id for v in newest.data] == ids[::-1]
    after = client.videos.list(limit=1, after=ids[1])
    assert [v.id for v in after.data] == [ids[0]]


def test_stream_sends_the_files_bytes_as_they_are_made_and_from_the_start_to_late_readers(client, server):
    base = server[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    video = client.videos.create(prompt="a red blob moves right", extra_body={"num_frames": 96,
                                                                              "num_steps": STEPS})
    url = f"{base}/v1/videos/{video.id}/content?stream=true"
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("GET", url, headers=headers) as early:
            assert early.status_code == 200 and early.headers["content-type"] == "video/mp4"
            pieces = early.iter_raw()
            got = [next(pieces)]
            assert got[0][4:8] == b"ftyp"  # the init segment comes first
            # A reader that connects while the job runs gets everything from the first byte.
            with http.stream("GET", url, headers=headers) as late:
                late_bytes = late.read()
            got.extend(pieces)
        early_bytes = b"".join(got)
        file_bytes = client.videos.download_content(video.id).read()
        assert early_bytes == file_bytes and late_bytes == file_bytes
        # Once completed, the stream is the file.
        assert http.get(url, headers=headers).content == file_bytes
    assert probe_video_bytes(file_bytes).frames == 96


def probe_video_bytes(data: bytes):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        return probe_video(f.name)


def test_the_tee_hands_out_exactly_the_files_bytes(tmp_path):
    from magi_train.data.video_io import StreamingMp4Writer

    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 48, 3), dtype=np.uint8)
    pieces = []
    with StreamingMp4Writer(tmp_path / "a.mp4", 48, 32, 12, on_bytes=pieces.append) as w:
        w.write(frames[:4])
        assert pieces and b"".join(pieces) == w.partial_path.read_bytes()  # the growing file, as it grows
        w.write(frames[4:])
    assert len(pieces) > 10 and b"".join(pieces) == (tmp_path / "a.mp4").read_bytes()


def test_live_prompt_reaches_a_later_chunk_and_the_video_is_the_static_prompt_lists(server, pipe, tmp_path):
    from websockets.sync.client import connect

    base = server[0].replace("http://", "ws://")
    first, new = "a red blob moves right", "a blue blob moves down"
    frames, seed, steps = 144, 11, 8  # 6 chunks
    events, data = [], []
    with connect(f"{base}/v1/videos/live?api_key={KEY}", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"type": "create", "prompt": first, "num_frames": frames, "seed": seed,
                            "num_steps": steps}))
        sent = False
        while True:
            message = ws.recv(timeout=TIMEOUT)
            if isinstance(message, bytes):
                data.append(message)
                continue
            event = json.loads(message)
            events.append(event)
            if event["type"] == "chunk" and event["index"] == 0 and not sent:
                ws.send(json.dumps({"type": "prompt", "prompt": new}))
                sent = True
            if event["type"] in ("done", "error"):
                break
    kinds = [e["type"] for e in events]
    assert kinds[0] == "created" and kinds[-1] == "done", events[-1]
    assert data[0][4:8] == b"ftyp"
    accepted = [e for e in events if e["type"] == "prompt_accepted"]
    applied = [e for e in events if e["type"] == "prompt_applied"]
    assert accepted == [{"type": "prompt_accepted", "prompt": new}]
    assert len(applied) == 1 and applied[0]["prompt"] == new
    k = applied[0]["chunk"]
    assert 1 <= k < 6 and kinds.index("prompt_accepted") < kinds.index("prompt_applied")
    chunks = [e for e in events if e["type"] == "chunk"]
    assert [c["index"] for c in chunks] == list(range(6)) and all(c["num_chunks"] == 6 for c in chunks)
    assert [c["prompt"] for c in chunks] == [first] * k + [new] * (6 - k)
    assert any(e["type"] == "progress" for e in events)
    video = events[-1]["video"]
    assert video["status"] == "completed" and video["prompts"] == [first] * k + [new] * (6 - k)
    # The binary messages are the published file, and it is the static prompt list's video, byte for byte.
    joined = b"".join(data)
    assert joined == (server[1].root / video["id"] / "video.mp4").read_bytes()
    static = reference_mp4(pipe, tmp_path, "static", [first] * k + [new], num_frames=frames, num_steps=steps,
                           seed=seed)
    assert joined == static
    ref = tmp_path / "static.mp4"
    assert torch.equal(read_video(ref, 24, 64, 64), read_video(server[1].root / video["id"] / "video.mp4", 24, 64, 64))


def test_websocket_needs_the_key_and_a_create_message(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    base = server[0].replace("http://", "ws://")
    with connect(f"{base}/v1/videos/live?api_key=wrong", open_timeout=TIMEOUT) as ws:
        # Refused at once (before any message), then closed with 1008 (policy violation).
        assert json.loads(ws.recv(timeout=TIMEOUT))["error"]["code"] == "invalid_api_key"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd.code == 1008
    with connect(f"{base}/v1/videos/live?api_key={KEY}", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"type": "create", "prompt": "x", "num_frames": 100000}))
        error = json.loads(ws.recv(timeout=TIMEOUT))["error"]
        assert error["code"] == "limit_exceeded" and "server.max_frames" in error["message"]


def test_extend_continues_from_the_cached_latents_by_id_or_by_uploading_the_mp4(client, pipe, tmp_path):
    from openai import omit

    source = client.videos.create(prompt="a red blob moves right", extra_body={"num_frames": 30,
                                                                               "num_steps": STEPS, "seed": 1})
    assert wait(client, source.id).status == "completed"
    by_id = client.videos.extend(prompt="the blob turns blue", seconds="1", video=omit,
                                 extra_body={"video": {"id": source.id}, "num_steps": STEPS, "seed": 2})
    mp4 = client.videos.download_content(source.id).read()
    by_upload = client.videos.extend(prompt="the blob turns blue", seconds="1", video=("s.mp4", mp4, "video/mp4"),
                                     extra_body={"num_steps": STEPS, "seed": 2})
    for v in (by_id, by_upload):
        done = wait(client, v.id)
        assert done.status == "completed", done.error
        assert done.model_extra["mode"] == "v2v" and done.model_extra["extended_from_video_id"] == source.id
        assert done.seconds == "1"  # 24 new frames (the continuation; the source is not repeated)
    a, b = (client.videos.download_content(v.id).read() for v in (by_id, by_upload))
    assert a == b and probe_video_bytes(a).frames == 24
    # It is the pipeline's continuation of the source's clean latents (the first ceil(30 / 4) latent frames).
    latents = pipe("a red blob moves right", num_frames=30, num_steps=STEPS, seed=1, output_type="latent").latents
    assert a == reference_mp4(pipe, tmp_path, "ext", "the blob turns blue", mode="v2v", num_frames=24,
                              prefix_latents=latents[:, :, :8], num_steps=STEPS, seed=2)
    remix = client.videos.remix(source.id, prompt="a green blob")
    done = wait(client, remix.id)
    assert done.status == "completed" and done.remixed_from_video_id == source.id and done.prompt == "a green blob"
    assert done.model_extra["seed"] == 1 and done.model_extra["num_frames"] == 30


def test_requests_beyond_the_limits_are_refused_naming_the_limit(client, server):
    import openai

    cases = [({"num_frames": 201}, "server.max_frames"), ({"num_steps": 9}, "server.max_steps"),
             ({"num_steps": 0}, "num_steps=0"), ({"text_scale": 7.5}, "unknown field 'text_scale'"),
             ({"mode": "i2v"}, "input_reference")]
    for extra, named in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.videos.create(prompt="a red blob", extra_body=extra)
        assert named in e.value.message, (extra, e.value.message)
    with pytest.raises(openai.BadRequestError, match="server.max_frames"):
        client.videos.create(prompt="a red blob", seconds="12")  # 288 frames at 24 fps
    with pytest.raises(openai.BadRequestError, match="this server generates 64x64"):
        client.videos.create(prompt="a red blob", size="720x1280")
    with pytest.raises(openai.BadRequestError, match="server.max_width"):
        client.videos.create(prompt="a red blob", size="1792x1024")
    with pytest.raises(openai.BadRequestError, match="vae.kind=preview"):
        client.videos.create(prompt="a red blob", input_reference=("cat.png", b"\x89PNG not really", "image/png"))
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.download_content(client.videos.list(limit=1).data[0].id, variant="thumbnail")
    assert e.value.body["param"] == "variant"


def test_the_key_is_required(server):
    import openai

    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.videos.list()
    assert e.value.body["code"] == "invalid_api_key"
    assert httpx.post(server[0] + "/v1/videos", json={"prompt": "x"}).status_code == 401
    # A link cannot send a header: the key as a query parameter does, on every /v1 route.
    assert httpx.get(server[0] + "/v1/videos?api_key=wrong").status_code == 401
    assert httpx.get(server[0] + f"/v1/videos?api_key={KEY}").status_code == 200
    info = httpx.get(server[0] + f"/v1/magi/info?api_key={KEY}").json()
    assert (info["model"], info["chunk_frames"], info["width"], info["height"], info["auth"]) == \
        ("tiny", 24, 64, 64, True)
    assert httpx.get(server[0] + "/v1/magi/info").status_code == 401


def test_ids_are_checked_and_nothing_outside_output_root_is_served(client, server, tmp_path):
    import openai

    base, store = server
    secret = store.root.parent / "secret.mp4"
    secret.write_bytes(b"not for you")
    headers = {"Authorization": f"Bearer {KEY}"}
    attempts = ["../secret.mp4", "..%2Fsecret.mp4", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2fsecret.mp4",
                "video_" + "0" * 32, "video_" + "0" * 31 + "/../../secret.mp4", "VIDEO_" + "A" * 32, "%00"]
    with httpx.Client(timeout=TIMEOUT) as http:
        for bad in attempts:
            for path in (f"/v1/videos/{bad}", f"/v1/videos/{bad}/content", f"/v1/videos/{bad}/content?stream=true"):
                r = http.get(base + path, headers=headers)
                assert r.status_code == 404, (path, r.status_code)
                assert b"not for you" not in r.content
            assert http.delete(f"{base}/v1/videos/{bad}", headers=headers).status_code == 404
    with pytest.raises(openai.NotFoundError) as e:
        client.videos.extend(prompt="x", seconds="1", video=openai.omit, extra_body={"video": {"id": "../secret"}})
    assert e.value.body["code"] == "video_not_found"
    assert secret.read_bytes() == b"not for you"


def test_a_full_queue_answers_429_and_delete_cancels_queued_and_running_jobs(client, server):
    import openai

    long = {"num_frames": 192, "num_steps": 8}
    running = client.videos.create(prompt="a red blob", extra_body=long)
    queued = client.videos.create(prompt="a red blob", extra_body=long)  # max_queue=1: the one waiting place
    with pytest.raises(openai.RateLimitError) as e:
        client.videos.create(prompt="a red blob", extra_body=long)
    assert e.value.body["code"] == "queue_full" and "server.max_queue=1" in e.value.message
    assert client.videos.delete(queued.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(queued.id)
    deadline = time.monotonic() + TIMEOUT
    while client.videos.retrieve(running.id).status != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.ConflictError):
        client.videos.download_content(running.id)  # not completed yet
    assert client.videos.delete(running.id).deleted
    # The running job stops at its next sampler step and its files go; the place in the queue is free again.
    deadline = time.monotonic() + TIMEOUT
    while (server[1].root / running.id).exists():
        assert time.monotonic() < deadline, "the cancelled job's files were not removed"
        time.sleep(0.05)
    after = client.videos.create(prompt="a red blob", extra_body={"num_frames": 8, "num_steps": STEPS})
    assert wait(client, after.id).status == "completed"


def test_the_page_and_health(server):
    base = server[0]
    r = httpx.get(base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert httpx.get(base + "/health").json()["model"] == "tiny"
    assert httpx.get(base + "/static/does-not-exist.js").status_code == 404
