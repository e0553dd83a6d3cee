"""python -m hybridchat.serve [group=option ...] [key=value ...]: a Hydra app with chat's names
(conf/serve.yaml); see the package's docstring and docs/serve.md."""

from __future__ import annotations

import os
import socket
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from hybridchat.core.errors import UserError, run_hydra_app, run_or_exit
from hybridchat.serve.config import ServeConfig, check, register
from hybridchat.training.answering import open_assistant

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or one UserError (an address in use, a host that is not here)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): give another port= (0: any free "
                        f"one) or host=") from None
    return sock


def run(cfg: DictConfig) -> None:
    import uvicorn

    from hybridchat.serve.app import build_app
    from hybridchat.serve.batcher import Batcher

    config: ServeConfig = OmegaConf.to_object(cfg)
    check(config)
    sock = bind(config.host, config.port)  # before the model loads: a port in use fails at once
    assistant = open_assistant(cfg, config, batch_size=config.batch_size)
    print(assistant.describe(), file=sys.stderr)
    model_id = f"{assistant.run.config.run_name}/{assistant.run.meta.get('stage', assistant.path.parent.name)}"
    batcher = Batcher(assistant, config.batch_size, config.queue_size)
    app = build_app(batcher, config, model_id)
    sock.listen(1024)
    host, port = sock.getsockname()[:2]
    if config.host not in LOOPBACK and config.api_key is None:
        print(f"warning: serving {config.host} without an api_key: anyone who reaches this port can use it",
              file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model_id} on http://{shown}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])


register()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_or_exit(run, cfg)


if __name__ == "__main__":
    run_hydra_app(main)
