"""The job store and its worker: one engine per process, jobs run one at a time on a worker thread.

The asyncio loop only ever touches the store under its lock (create, look up, cancel) and follows a job's
`Feed`; generation runs on the worker thread. Files live only under `output_root/<video id>/`: `video.mp4`
(published when complete; the fragmented mp4 grows as `.video.mp4.<random>.partial` meanwhile),
`latents.safetensors` (the clean latents, for extensions) and `inputs/` (uploaded conditioning). Ids are
`video_` + 32 hex digits, checked before any path is built from them.

Shutdown (`shutdown(grace)`): no new jobs (the app answers 503), queued jobs are cancelled at once (status failed,
error code `cancelled_shutdown`), the running job may finish within `grace` seconds and is cancelled after it;
the log lists which jobs finished and which were cancelled.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from magi_infer.server.feed import Feed

logger = logging.getLogger("magi_infer.server")

ID_PATTERN = re.compile(r"video_[0-9a-f]{32}")
PROGRESS_EVERY_S = 0.25  # progress events at most this often (the last step always)


def valid_id(video_id: str) -> bool:
    return isinstance(video_id, str) and ID_PATTERN.fullmatch(video_id) is not None


@dataclass
class Job:
    id: str
    spec: dict
    dir: Path
    model: str
    size: str
    fps: int
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    completed_at: Optional[int] = None
    error: Optional[dict] = None
    chunks_done: int = 0
    num_chunks: Optional[int] = None
    frames: int = 0
    prompts_used: List[str] = field(default_factory=list)
    remixed_from: Optional[str] = None
    extended_from: Optional[str] = None
    feed: Optional[Feed] = field(default_factory=Feed)  # None once the job has finished (see _release_feed)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_code: str = "cancelled"
    live: object = None  # LivePrompts of a WebSocket session
    deleted: bool = False
    sha256: Optional[str] = None  # of the completed video.mp4: an upload of these bytes is this video

    @property
    def video_path(self) -> Path:
        return self.dir / "video.mp4"

    @property
    def latents_path(self) -> Path:
        return self.dir / "latents.safetensors"

    @property
    def inputs_dir(self) -> Path:
        return self.dir / "inputs"

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    def inputs(self) -> Dict[str, Path]:
        d = self.inputs_dir
        return {p.name: p for p in sorted(d.iterdir())} if d.is_dir() else {}

    def to_object(self) -> dict:
        s = self.spec
        frames = self.frames if self.status == "completed" else s["num_frames"]
        return {
            "id": self.id, "object": "video", "model": self.model, "status": self.status, "progress": self.progress,
            "created_at": self.created_at, "completed_at": self.completed_at, "expires_at": None,
            "error": self.error, "seconds": f"{frames / self.fps:g}", "size": self.size, "prompt": s["prompt"],
            "remixed_from_video_id": self.remixed_from,
            # MAGI fields
            "prompts": self.prompts_used or s["prompts"], "mode": s["mode"], "num_frames": frames,
            "seed": s["seed"], "num_steps": s["num_steps"], "num_chunks": self.num_chunks,
            "chunks_done": self.chunks_done, "extended_from_video_id": self.extended_from, "live": s["live"],
        }


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class JobStore:
    """Jobs by id (insertion order = creation order), the queue, and the worker thread that runs them."""

    def __init__(self, pipe, server_cfg, model_name: str, followers: bool = False) -> None:
        self.pipe, self.cfg, self.model_name = pipe, server_cfg, model_name
        self.root = Path(server_cfg.output_root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        v = pipe.config.video
        self.size, self.fps = f"{v.width}x{v.height}", v.fps
        self.followers = followers  # other ranks to broadcast each job to (torchrun)
        self._lock = threading.Condition()
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._queue: deque = deque()
        self._running: Optional[Job] = None
        self._accepting = True
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self._finished_at_shutdown: List[str] = []
        self._cancelled_at_shutdown: List[str] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="magi-serve-worker", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        with self._lock:
            return self._accepting

    def shutdown(self, grace_s: float) -> None:
        """Stop taking jobs, cancel the queued ones, give the running one `grace_s` seconds, then cancel it."""
        with self._lock:
            again = not self._accepting
            self._accepting = False
        if again:  # a second signal, or the lifespan after a signal: cancel now and wait for the worker
            self.cancel_running()
            if self._thread is not None:
                self._thread.join()
            return
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
            running = self._running
        for job in queued:
            self._fail(job, "cancelled_shutdown", "cancelled: the server shut down before this job started")
            self._cancelled_at_shutdown.append(job.id)
        if running is not None:
            logger.info("shutting down: waiting up to %gs for running job %s; %d queued job(s) cancelled%s",
                        grace_s, running.id, len(queued), _ids(queued))
        elif queued:
            logger.info("shutting down: %d queued job(s) cancelled%s", len(queued), _ids(queued))
        deadline = time.monotonic() + grace_s
        with self._lock:
            while self._running is not None and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            still = self._running
        if still is not None:
            logger.info("shutting down: job %s did not finish within server.shutdown_grace_s=%g; cancelling it",
                        still.id, grace_s)
            self.cancel_running()
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        logger.info("shutdown complete: finished: %s; cancelled: %s",
                    ", ".join(self._finished_at_shutdown) or "none",
                    ", ".join(self._cancelled_at_shutdown) or "none")

    def cancel_running(self) -> None:
        with self._lock:
            job = self._running
        if job is not None and not job.cancel.is_set():
            job.cancel_code = "cancelled_shutdown"
            job.cancel.set()

    # ------------------------------------------------------------------ the asyncio side
    def new_id(self) -> str:
        return "video_" + secrets.token_hex(16)

    def add(self, spec: dict, inputs: Dict[str, bytes], *, live=None, remixed_from=None, extended_from=None,
            copy_inputs_from: Optional[Job] = None) -> Job:
        """Queue a job (QueueFull beyond server.max_queue waiting, ShuttingDown after shutdown began)."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown()
            # Jobs that would wait behind a running one with this one added (a queued job with nothing running
            # is about to start, whether or not the worker has taken it yet).
            waiting = len(self._queue) + 1 - (1 if self._running is None else 0)
            if waiting > self.cfg.max_queue:
                raise QueueFull()
            job_id = self.new_id()
            job = Job(job_id, spec, self.root / job_id, self.model_name, self.size, self.fps, live=live,
                      remixed_from=remixed_from, extended_from=extended_from)
            job.inputs_dir.mkdir(parents=True)
            if copy_inputs_from is not None:
                for name, path in copy_inputs_from.inputs().items():
                    shutil.copyfile(path, job.inputs_dir / name)
            for name, data in inputs.items():
                (job.inputs_dir / name).write_bytes(data)
            self._jobs[job_id] = job
            self._queue.append(job)
            self._evict()
            self._lock.notify_all()
        return job

    def get(self, video_id: str) -> Optional[Job]:
        if not valid_id(video_id):
            return None
        with self._lock:
            job = self._jobs.get(video_id)
            return None if job is None or job.deleted else job

    def find_video(self, data: bytes) -> Optional[Job]:
        """The completed job whose video has exactly these bytes (an uploaded copy of one of ours)."""
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            for job in self._jobs.values():
                if job.sha256 == digest and job.status == "completed" and not job.deleted:
                    return job
        return None

    def list(self) -> List[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.deleted]

    def cancel(self, job: Job, code: str = "cancelled") -> None:
        """Cancel a queued job at once, or a running one after its current sampler step."""
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
                queued = True
            else:
                queued = False
                if job is self._running:
                    job.cancel_code = code
                    job.cancel.set()
        if queued:
            self._fail(job, code, "cancelled before it started")

    def delete(self, job: Job) -> None:
        """Cancel it if needed and remove it with its files (a running job's files go when it stops)."""
        with self._lock:
            job.deleted = True
            running = job is self._running
        self.cancel(job, "cancelled")
        if not running:
            self._remove(job)

    # ------------------------------------------------------------------ the worker thread
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopped:
                    if not self._lock.wait(timeout=self.cfg.keepalive_s) and self.followers:
                        break  # idle: ping the followers (below), so their collectives do not time out
                if self._stopped and not self._queue:
                    break
                job = self._queue.popleft() if self._queue else None
                self._running = job
            if job is None:
                self._send({"type": "ping"})
                continue
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None
                    if not self._accepting:
                        (self._finished_at_shutdown if job.status == "completed"
                         else self._cancelled_at_shutdown).append(job.id)
                    if job.deleted:
                        self._remove(job)
                    self._lock.notify_all()
        self._send({"type": "shutdown"})

    def _send(self, message: dict, files: Optional[Dict[str, bytes]] = None) -> None:
        if self.followers:
            from magi_infer.server.runner import send

            send(self.pipe, message, files)

    def _run(self, job: Job) -> None:
        from magi_infer.engine import Cancelled
        from magi_infer.server.runner import run_spec
        from magi_train.data.video_io import StreamingMp4Writer

        job.status = "in_progress"
        logger.info("job %s started: %s, %d frames, %d prompt(s)", job.id, job.spec["mode"],
                    job.spec["num_frames"], len(job.spec["prompts"]))
        inputs = job.inputs()
        v = self.pipe.config.video
        latents = []
        last_progress = [0.0]
        applied_seen = [0]

        def report_applied() -> None:
            if job.live is None:
                return
            applied = job.live.applied
            for chunk, prompt in applied[applied_seen[0]:]:
                job.feed.append({"type": "prompt_applied", "chunk": chunk, "prompt": prompt})
            applied_seen[0] = len(applied)

        def on_step(step: int, total: int) -> None:
            job.progress = min(99, int(100 * step / total))
            now = time.monotonic()
            if now - last_progress[0] >= PROGRESS_EVERY_S or step == total:
                last_progress[0] = now
                job.feed.append({"type": "progress", "progress": job.progress, "step": step, "total_steps": total})
            report_applied()

        def on_chunk(chunk) -> None:
            report_applied()
            if len(chunk.frames):
                writer.write(chunk.frames)
            job.frames += len(chunk.frames)
            latents.append(chunk.latent.detach().cpu())
            job.prompts_used.append(chunk.prompt)
            job.chunks_done, job.num_chunks = chunk.index + 1, chunk.num_chunks
            job.feed.append({"type": "chunk", "index": chunk.index, "num_chunks": chunk.num_chunks,
                             "prompt": chunk.prompt, "frames": int(len(chunk.frames)),
                             "seconds": round(float(chunk.seconds), 3)})

        writer = None
        try:
            self._send({"type": "job", "id": job.id, "spec": job.spec},
                       {name: path.read_bytes() for name, path in inputs.items()})
            # The tee hands the mp4's bytes to the feed as the muxer writes them: the stream is the file.
            writer = StreamingMp4Writer(job.video_path, v.width, v.height, v.fps, crf=v.crf,
                                        on_bytes=job.feed.append)
            run_spec(self.pipe, job.spec, inputs, live=job.live, cancel=job.cancel, callback=on_step,
                     on_chunk=on_chunk)
            writer.close()
            from safetensors.torch import save_file

            if latents:
                from magi_infer.server.runner import video_latents

                save_file({"latents": video_latents(self.pipe, job.spec, inputs, latents)}, str(job.latents_path))
            report_applied()
            import hashlib

            job.sha256 = hashlib.sha256(job.video_path.read_bytes()).hexdigest()
            job.progress, job.status, job.completed_at = 100, "completed", int(time.time())
            logger.info("job %s completed: %d frames, %d chunks", job.id, job.frames, job.chunks_done)
        except Cancelled:
            self._abort(writer)
            self._fail(job, job.cancel_code, "cancelled while generating" + (
                " (the server shut down)" if job.cancel_code == "cancelled_shutdown" else ""))
        except ValueError as e:  # the pipeline's own request checks (PreflightError is one)
            self._abort(writer)
            self._fail(job, "invalid_request", str(e))
        except Exception as e:  # noqa: BLE001 - the job fails, the server goes on
            logger.exception("job %s failed", job.id)
            self._abort(writer)
            self._fail(job, "generation_failed", f"{type(e).__name__}: {e}")
        finally:
            self._release_feed(job)

    @staticmethod
    def _release_feed(job: Job) -> None:
        """End the feed; readers that hold it finish reading it, later ones read the file (its bytes are the
        same), so a finished job keeps no copy of its video in memory. The status is set before this."""
        feed = job.feed
        if feed is not None:
            feed.close()
            job.feed = None

    @staticmethod
    def _abort(writer) -> None:
        if writer is not None:
            try:
                writer.abort()
            finally:
                writer.partial_path.unlink(missing_ok=True)

    def _fail(self, job: Job, code: str, message: str) -> None:
        job.status, job.error, job.completed_at = "failed", {"code": code, "message": message}, int(time.time())
        self._release_feed(job)
        logger.info("job %s failed (%s): %s", job.id, code, message)

    # ------------------------------------------------------------------ files
    def _remove(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)
        path = job.dir.resolve()
        if path.parent == self.root and valid_id(path.name):  # never anything outside output_root
            shutil.rmtree(path, ignore_errors=True)

    def _evict(self) -> None:
        """Called with the lock held: drop the oldest finished jobs beyond server.retain_jobs."""
        finished = [j for j in self._jobs.values() if j.finished]
        for job in finished[: max(0, len(finished) - self.cfg.retain_jobs)]:
            self._jobs.pop(job.id, None)
            path = job.dir.resolve()
            if path.parent == self.root and valid_id(path.name):
                shutil.rmtree(path, ignore_errors=True)


def _ids(jobs) -> str:
    return (": " + ", ".join(j.id for j in jobs)) if jobs else ""
