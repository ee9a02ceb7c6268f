"""`magi-serve` (also `python -m magi_infer.server`): build the engine once, serve it over HTTP.

    magi-serve model=tiny ckpt.dir=outputs/tiny/checkpoints server.port=8000
    magi-serve model=magi1_4.5b_distill ckpt.dir=ckpt/magi/4.5B_distill text.t5_dir=ckpt/t5 vae.dir=ckpt/vae \
        server.host=0.0.0.0 server.api_key=KEY
    torchrun --nproc_per_node 2 -m magi_infer.server model=... ckpt.dir=... parallel.cp=2

Every key is a Hydra override of conf/serve.yaml (magi_infer/server/config.py). Under torchrun all ranks build
the engine; rank 0 serves HTTP and broadcasts each job to the others (magi_infer/server/runner.py).

SIGTERM / SIGINT: new jobs get 503, queued ones are cancelled, the running job may finish within
server.shutdown_grace_s and is cancelled after it; then the server exits (a second SIGINT cancels at once).
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import hydra
from omegaconf import DictConfig, OmegaConf

from magi_infer.server.config import register_serve_config, to_serve_config
from magi_train.config.paths import config_dir

logger = logging.getLogger("magi_infer.server")


def generate_part(cfg):
    """The GenerateConfig inside a ServeConfig (what the pipeline is built from)."""
    from magi_infer.config import GenerateConfig

    return GenerateConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GenerateConfig)})


def run(cfg: DictConfig) -> None:
    from magi_infer.pipeline import MagiPipeline
    from magi_infer.preflight import check_one_replica
    from magi_train.parallel.groups import init_parallel, shutdown

    serve_cfg = to_serve_config(cfg)
    gen_cfg = generate_part(serve_cfg)
    parallel = init_parallel(gen_cfg.parallel)
    try:
        check_one_replica(parallel)
        pipe = MagiPipeline(gen_cfg, parallel=parallel if parallel.world_size > 1 else None)
        if not pipe.is_main:
            import signal

            from magi_infer.server.runner import follow

            # torchrun passes a SIGTERM / SIGINT to every rank; a follower ends when rank 0, after draining,
            # sends it the shutdown message (dying now would leave rank 0's running job in a broken collective).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(pipe)
            return
        # One line per job from this server; the mp4 writer's note on its temporary file is noise here.
        logging.getLogger("magi_train.data.video_io").setLevel(logging.WARNING)
        shown = dataclasses.replace(serve_cfg, server=dataclasses.replace(
            serve_cfg.server, api_key=None if serve_cfg.server.api_key is None else "<set>"))
        print(OmegaConf.to_yaml(OmegaConf.structured(shown)), end="", flush=True)
        serve(pipe, serve_cfg.server)
    finally:
        shutdown()


def serve(pipe, server_cfg) -> None:
    """Run the app with uvicorn until SIGTERM / SIGINT, then drain (see the module docstring)."""
    import uvicorn

    from magi_infer.server.app import create_app

    app = create_app(pipe, server_cfg)
    store = app.state.store

    class Server(uvicorn.Server):
        draining = False

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.servers:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"serving on http://{host}:{port}", flush=True)

        def handle_exit(self, sig, frame) -> None:
            # uvicorn would close the listening socket at once; drain first (503 for new jobs meanwhile), and do
            # not re-raise the signal afterwards: a drained server exits with status 0.
            if self.draining:
                store.cancel_running()
                return
            self.draining = True
            logger.info("signal %d: shutting down (server.shutdown_grace_s=%g)", sig, server_cfg.shutdown_grace_s)

            def drain() -> None:
                store.shutdown(server_cfg.shutdown_grace_s)
                self.should_exit = True

            threading.Thread(target=drain, name="magi-serve-drain", daemon=True).start()

    config = uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5, ws="websockets-sansio")
    Server(config).run()


register_serve_config()


@hydra.main(config_path=str(config_dir()), config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
