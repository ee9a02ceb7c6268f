"""Load test of magi-serve: concurrent clients, a bounded queue, nothing lost, memory flat.

    python tools/bench_serve_load.py --ckpt tests/fixtures/tiny_base     # starts its own tiny server
    python tools/bench_serve_load.py --ckpt CKPT --clients 16 --requests 2 --chunks 1 2 --steps 4 --max-queue 4
    python tools/bench_serve_load.py --url http://127.0.0.1:8000 --pid PID   # a server already running
    python tools/bench_serve_load.py --url URL --api-key KEY --chunks 1 --steps 8

`--ckpt` starts `python -m magi_infer.server model=tiny ckpt.dir=CKPT server.port=0 ...` on 127.0.0.1 (with
server.max_queue=--max-queue, so that a burst of clients overflows it) and stops it at the end; `--url` drives a
running server (its RSS is sampled when `--pid` names its process).

After two warm-up jobs, every wave starts `--clients` threads at once (their first creates `--stagger` apart, the
connections already open); each makes `--requests` requests one after the other, of `--chunks` chunks (cycled
over the clients) at `--steps` steps per chunk. Half of the clients (alternately) use the HTTP API (POST
/v1/videos, then GET .../content?stream=true until the stream ends), the other half the live WebSocket (GET
/v1/videos/live: create, chunk and done messages, the mp4 as binary messages). A request is either accepted or
refused with 429 (queue full); anything else is an error. Every accepted job must end completed, its streamed
bytes must be exactly the stored mp4 (GET .../content), the mp4 must decode to the requested frames, and GET
/v1/videos must list exactly the jobs that were accepted (a refused request leaves no job behind).

Printed: per wave, the accepted / refused counts, percentiles of create -> completed and of create -> first chunk
(the first moof fragment on the HTTP stream, the `chunk` message on the WebSocket) over the accepted jobs, jobs
and frames per second; the server's RSS before the waves, its peak during each and after each. `--json PATH`
writes all of it (and the list of errors) for tests/e2e/test_serve_load.py, which checks correctness only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
READY = "serving on "


@dataclass
class Outcome:
    client: int
    via: str  # "http" | "ws"
    chunks: int
    status: str = "error"  # "completed" | "refused" | "failed" | "error"
    video_id: Optional[str] = None
    frames: int = 0  # requested
    create_s: Optional[float] = None  # wall clock (time.time) when the create was sent
    first_chunk_s: Optional[float] = None  # after the create
    completed_s: Optional[float] = None  # after the create
    streamed: bytes = field(default=b"", repr=False)
    error: Optional[str] = None


# ------------------------------------------------------------------------------------------ the server


class Server:
    """`python -m magi_infer.server` as a child process, on a free port of 127.0.0.1."""

    def __init__(self, ckpt: Path, output_root: Path, max_queue: int, extra: List[str], timeout: float = 300.0):
        overrides = ["model=tiny", f"ckpt.dir={ckpt}", "server.host=127.0.0.1", "server.port=0",
                     f"server.max_queue={max_queue}", f"server.output_root={output_root}", "server.retain_jobs=100000",
                     *extra]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.log_path = output_root.parent / "server.log"
        output_root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "magi_infer.server", *overrides], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.pid = self.proc.pid
        self.url = self._wait_ready(timeout)
        # Keep draining stdout, or a chatty server would block on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break  # exited
            lines.append(line)
            self.log.write(line)
            if READY in line:
                return line.split(READY, 1)[1].split()[0].rstrip("/")
        self.stop()
        raise RuntimeError(f"magi-serve did not print '{READY}URL' (exit code {self.proc.returncode}); "
                           f"stdout: {''.join(lines)[-2000:]}; stderr in {self.log_path}: "
                           f"{self.log_path.read_text()[-3000:]}")

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class RssSampler:
    """The server process's resident set size, sampled every `period` seconds on a thread."""

    def __init__(self, pid: Optional[int], period: float = 0.1):
        import psutil

        self.process = psutil.Process(pid) if pid else None
        self.period = period
        self.samples: List[int] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def now(self) -> Optional[int]:
        return self.process.memory_info().rss if self.process else None

    def __enter__(self):
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.now()
            if rss is not None:
                self.samples.append(rss)
            self._stop.wait(self.period)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------- clients


def _first_moof(buffer: bytearray, scanned: List[int]) -> bool:
    """Whether the top-level boxes in `buffer` reach a `moof` (the first fragment after the init segment);
    `scanned[0]` is where the next unread box header starts."""
    at = scanned[0]
    while at + 8 <= len(buffer):
        size = int.from_bytes(buffer[at:at + 4], "big")
        kind = bytes(buffer[at + 4:at + 8])
        if kind == b"moof":
            return True
        if size == 1:
            if at + 16 > len(buffer):
                break
            size = int.from_bytes(buffer[at + 8:at + 16], "big")
        if size < 8:
            raise ValueError(f"malformed mp4 stream: box {kind!r} at byte {at} has size {size}")
        at += size
    scanned[0] = at
    return False


def _error_text(response) -> str:
    try:
        return f"{response.status_code}: {response.json()['error']['message']}"
    except Exception:  # not OpenAI-style JSON
        return f"{response.status_code}: {response.text[:300]}"


def http_request(client, base: str, out: Outcome, body: dict, timeout: float, before=None) -> None:
    """POST /v1/videos, then follow GET .../content?stream=true to its end. `before`, when given, is called
    once the connection is open, just before the create (a wave's clients all create at once)."""
    if before is not None:
        client.get(f"{base}/health").raise_for_status()  # opens the kept-alive connection
        before()
    out.create_s = time.time()
    t0 = time.perf_counter()
    response = client.post(f"{base}/v1/videos", json=body)
    if response.status_code == 429:
        out.status = "refused"
        return
    if response.status_code != 200:
        out.error = f"POST /v1/videos: {_error_text(response)}"
        return
    video = response.json()
    out.video_id = video["id"]
    buffer, scanned = bytearray(), [0]
    with client.stream("GET", f"{base}/v1/videos/{out.video_id}/content", params={"stream": "true"},
                       timeout=timeout) as stream:
        if stream.status_code != 200:
            stream.read()
            out.error = f"GET .../content?stream=true: {_error_text(stream)}"
            return
        for piece in stream.iter_bytes():
            buffer += piece
            if out.first_chunk_s is None and _first_moof(buffer, scanned):
                out.first_chunk_s = time.perf_counter() - t0
    out.streamed = bytes(buffer)
    video = client.get(f"{base}/v1/videos/{out.video_id}").json()
    out.completed_s = time.perf_counter() - t0
    out.status = video["status"]
    if out.status != "completed":
        out.error = f"{out.video_id} ended {out.status}: {video.get('error')}"


def ws_request(base: str, out: Outcome, body: dict, timeout: float, before=None, headers=None) -> None:
    """A live session: create, then the mp4 and the messages until done (or a refusal)."""
    from websockets.sync.client import connect

    url = base.replace("http://", "ws://", 1) + "/v1/videos/live"
    buffer = bytearray()
    with connect(url, open_timeout=timeout, close_timeout=10, max_size=None, additional_headers=headers) as ws:
        if before is not None:
            before()
        out.create_s = time.time()
        t0 = time.perf_counter()
        ws.send(json.dumps({"type": "create", **body}))
        while True:
            message = ws.recv(timeout=timeout)
            if isinstance(message, bytes):
                buffer += message
                continue
            data = json.loads(message)
            kind = data.get("type")
            if kind == "created":
                out.video_id = data["video"]["id"]
            elif kind == "chunk" and out.first_chunk_s is None:
                out.first_chunk_s = time.perf_counter() - t0
            elif kind == "done":
                out.completed_s = time.perf_counter() - t0
                out.status = data["video"]["status"]
                if out.status != "completed":
                    out.error = f"{out.video_id} ended {out.status}: {data['video'].get('error')}"
                break
            elif kind == "error":
                error = data.get("error") or {}
                if out.video_id is None and _is_queue_full(error):
                    out.status = "refused"
                else:
                    out.error = f"WebSocket error message: {error}"
                break
    out.streamed = bytes(buffer)


def _is_queue_full(error: dict) -> bool:
    """The WebSocket's refusal of a create when the queue is full (the HTTP API's 429)."""
    code = str(error.get("code") or "")
    return code in ("429", "queue_full", "rate_limit_exceeded") or "queue" in str(error.get("message", "")).lower()


def run_client(index: int, base: str, chunks: int, chunk_frames: int, steps: int, requests: int,
               start: threading.Barrier, stagger: float, timeout: float, headers: Dict[str, str],
               outcomes: List[Outcome], lock: threading.Lock) -> None:
    import httpx

    via = "http" if index % 2 == 0 else "ws"
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for r in range(requests):
            # The first requests of a wave are sent together, each client's connection already open, client i
            # `stagger` x i seconds after the others' start: HTTP and WebSocket clients alternate in arrival
            # order instead of the faster kind (a message on an open socket) taking every place in the queue.
            before = (lambda: (start.wait(), time.sleep(stagger * index))) if r == 0 else None
            out = Outcome(client=index, via=via, chunks=chunks, frames=chunks * chunk_frames)
            body = {"prompt": f"client {index} request {r}: a red blob moves right", "num_frames": out.frames,
                    "num_steps": steps, "seed": index * 100 + r}
            try:
                if via == "http":
                    http_request(client, base, out, body, timeout, before)
                else:
                    ws_request(base, out, body, timeout, before, headers)
            except Exception as e:  # the run goes on; the error is reported and fails the test
                out.status, out.error = "error", f"{type(e).__name__}: {e}"
            with lock:
                outcomes.append(out)


def run_wave(base: str, args, chunk_frames: int, rss: RssSampler, headers: Dict[str, str]) -> dict:
    outcomes: List[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(args.clients)
    # Clients alternate HTTP / WebSocket (by index parity) and cycle the chunk counts by pairs, so that every
    # length is tried over both.
    threads = [threading.Thread(target=run_client,
                                args=(i, base, args.chunks[(i // 2) % len(args.chunks)], chunk_frames, args.steps,
                                      args.requests, barrier, args.stagger, args.timeout, headers, outcomes, lock))
               for i in range(args.clients)]
    with rss:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return {"outcomes": outcomes, "wall_s": wall, "rss_peak": max(rss.samples) if rss.samples else None}


# ------------------------------------------------------------------------------------------- checking


def list_all(client, base: str) -> Dict[str, str]:
    """id -> status of every video GET /v1/videos lists (all pages)."""
    found: Dict[str, str] = {}
    after = None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        response = client.get(f"{base}/v1/videos", params=params)
        response.raise_for_status()
        page = response.json()
        for video in page["data"]:
            if video["id"] in found:
                raise RuntimeError(f"GET /v1/videos lists {video['id']} twice")
            found[video["id"]] = video["status"]
        if not page.get("has_more"):
            return found
        after = page["last_id"]


def check(client, base: str, outcomes: List[Outcome], expected_ids: set, workdir: Path) -> List[str]:
    """Every accepted job completed, streamed exactly its stored mp4, which decodes to the requested frames;
    the list endpoint holds exactly the expected jobs, all completed."""
    from magi_train.data.video_io import probe_video

    errors = [f"client {o.client} ({o.via}): {o.error}" for o in outcomes if o.error]
    for o in outcomes:
        if o.status not in ("completed", "refused") and not o.error:
            errors.append(f"client {o.client} ({o.via}): ended {o.status}")
        if o.status != "completed":
            continue
        response = client.get(f"{base}/v1/videos/{o.video_id}/content")
        if response.status_code != 200:
            errors.append(f"GET {o.video_id}/content: {_error_text(response)}")
            continue
        if response.content != o.streamed:
            errors.append(f"{o.video_id}: the {len(o.streamed)} bytes streamed ({o.via}) differ from the "
                          f"{len(response.content)} bytes of its content")
        path = workdir / f"{o.video_id}.mp4"
        path.write_bytes(response.content)
        info = probe_video(path)
        if info.frames != o.frames or info.decode_error:
            errors.append(f"{o.video_id}: decodes to {info.frames} frames (asked for {o.frames}), "
                          f"decode error {info.decode_error}")
        path.unlink()
    listed = list_all(client, base)
    missing = expected_ids - listed.keys()
    extra = listed.keys() - expected_ids
    if missing:
        errors.append(f"accepted but not listed by GET /v1/videos: {sorted(missing)}")
    if extra:
        errors.append(f"listed by GET /v1/videos but never accepted (a refused request left a job?): {sorted(extra)}")
    not_done = {i: s for i, s in listed.items() if i in expected_ids and s != "completed"}
    if not_done:
        errors.append(f"listed but not completed: {not_done}")
    return errors


def percentiles(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:  # nearest rank
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(wave: dict, index: int, rss_after: Optional[int], chunk_frames: int) -> dict:
    outcomes = wave["outcomes"]
    done = [o for o in outcomes if o.status == "completed"]
    return {
        "wave": index,
        "requests": len(outcomes),
        "accepted": sum(o.video_id is not None for o in outcomes),
        "completed": len(done),
        "refused": sum(o.status == "refused" for o in outcomes),
        "errors": sum(o.error is not None for o in outcomes),
        "wall_s": wave["wall_s"],
        "latency_s": percentiles([o.completed_s for o in done]),
        "first_chunk_s": percentiles([o.first_chunk_s for o in done if o.first_chunk_s is not None]),
        "jobs_per_s": len(done) / wave["wall_s"],
        "frames_per_s": sum(o.frames for o in done) / wave["wall_s"],
        "rss_peak": wave["rss_peak"],
        "rss_after": rss_after,
        "chunk_frames": chunk_frames,
    }


def mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_table(args, rss_before: Optional[int], waves: List[dict]) -> None:
    queue = f"server.max_queue={args.max_queue}" if args.ckpt else f"the queue of {args.url}"
    print(f"\nmagi-serve load: {args.clients} clients x {args.requests} request(s), chunks {args.chunks} of "
          f"{args.chunk_frames} frames, {args.steps} steps/chunk, {queue}")
    print("| wave | requests | accepted | refused (429) | errors | create->completed p50 / p90 / p99 s | "
          "create->first chunk p50 / p90 / p99 s | jobs/s | frames/s | wall s | RSS peak MiB | RSS after MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for w in waves:
        lat, first = w["latency_s"], w["first_chunk_s"]
        print(f"| {w['wave']} | {w['requests']} | {w['accepted']} | {w['refused']} | {w['errors']} | "
              f"{fmt(lat['p50'])} / {fmt(lat['p90'])} / {fmt(lat['p99'])} | "
              f"{fmt(first['p50'])} / {fmt(first['p90'])} / {fmt(first['p99'])} | {w['jobs_per_s']:.2f} | "
              f"{w['frames_per_s']:.1f} | {w['wall_s']:.1f} | {mib(w['rss_peak'])} | {mib(w['rss_after'])} |")
    if rss_before is not None and waves:
        after = [w["rss_after"] for w in waves]
        growth = ", ".join(f"{(b - a) / 2**20:+.1f}" for a, b in zip([rss_before] + after[:-1], after))
        print(f"server RSS before the waves {mib(rss_before)} MiB; growth per wave (MiB): {growth}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--ckpt", type=Path, help="a tiny-model checkpoint dir: start a server on it")
    where.add_argument("--url", help="a running server's base URL (http://127.0.0.1:PORT)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, to sample its RSS")
    parser.add_argument("--api-key", help="the server's key (sent as Authorization: Bearer; --ckpt: server.api_key)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2], help="chunks per request, cycled over clients")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps per chunk")
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--stagger", type=float, default=0.01,
                        help="seconds between the clients' first creates of a wave (client i waits i x this)")
    parser.add_argument("--max-queue", type=int, default=4, help="server.max_queue of the server started")
    parser.add_argument("--chunk-frames", type=int, default=None,
                        help="frames per chunk of the model served (default: GET /v1/magi/info's, else 24)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per HTTP / WebSocket operation (hang guard)")
    parser.add_argument("--workdir", type=Path, default=None, help="server outputs and log (default: a temp dir)")
    parser.add_argument("--server-arg", action="append", default=[], help="one more override for the server")
    parser.add_argument("--json", type=Path, help="write the figures and errors here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.waves < 1:
        parser.error("--clients, --requests and --waves must be >= 1")

    import tempfile

    import httpx

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_serve_load_"))
    workdir.mkdir(parents=True, exist_ok=True)
    extra = args.server_arg + ([f"server.api_key={args.api_key}"] if args.api_key else [])
    server = Server(args.ckpt.resolve(), workdir / "outputs", args.max_queue, extra) if args.ckpt else None
    base = server.url if server else args.url.rstrip("/")
    pid = server.pid if server else args.pid
    try:
        rss = RssSampler(pid)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(timeout=args.timeout, headers=headers) as client:
            if args.chunk_frames is None:
                info = client.get(f"{base}/v1/magi/info")
                args.chunk_frames = info.json()["chunk_frames"] if info.status_code == 200 else 24
            # Warm-up, one job at a time, over HTTP (the longest request) and over the WebSocket (the shortest):
            # the first job of a new length pays for lazy initialisation (seconds, tens of MiB), not growth.
            lengths = sorted(set(args.chunks))
            warm = [Outcome(client=-1, via="http", chunks=lengths[-1], frames=lengths[-1] * args.chunk_frames),
                    Outcome(client=-1, via="ws", chunks=lengths[0], frames=lengths[0] * args.chunk_frames)]
            for w in warm:
                body = {"prompt": "warm-up", "num_frames": w.frames, "num_steps": args.steps}
                if w.via == "http":
                    http_request(client, base, w, body, args.timeout)
                else:
                    ws_request(base, w, body, args.timeout, headers=headers)
                if w.status != "completed":
                    raise RuntimeError(f"a warm-up job ({w.via}, {w.chunks} chunks) did not complete: "
                                       f"{w.status} {w.error}")
            expected = {w.video_id for w in warm}
            rss_before = rss.now()
            waves, outcomes = [], list(warm)
            for w in range(args.waves):
                wave = run_wave(base, args, args.chunk_frames, rss, headers)
                outcomes += wave["outcomes"]
                expected |= {o.video_id for o in wave["outcomes"] if o.video_id}
                waves.append(summarize(wave, w + 1, rss.now(), args.chunk_frames))
            errors = check(client, base, outcomes, expected, workdir)
    finally:
        if server:
            server.stop()
    print_table(args, rss_before, waves)
    for e in errors:
        print("ERROR:", e)
    if args.json:
        result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "rss_before": rss_before, "waves": waves, "errors": errors,
                  "outcomes": [{k: v for k, v in asdict(o).items() if k != "streamed"} for o in outcomes]}
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
