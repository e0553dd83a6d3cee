"""serve's settings: chat's (the checkpoint, its retriever, the answers), plus the server's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

from hybridchat.infra import config as config_schema
from hybridchat.training.answering import AnsweringConfig
from hybridchat.training.stages import stage_schemas


@dataclass
class ServeConfig(AnsweringConfig):
    # Loopback only unless told: the API has no per-user limits, so a network address wants api_key too.
    host: str = "127.0.0.1"
    port: int = 8000                 # 0: any free port, printed at start
    # Required as "Authorization: Bearer <key>" on /v1/* and /search; null: no key. From the
    # environment by default so that it shows in no process list or shell history.
    api_key: Optional[str] = "${oc.env:HYBRIDCHAT_API_KEY,null}"
    batch_size: int = 8              # replies decoded together; a request joins the running batch at its next step
    queue_size: int = 64             # requests waiting for room in the batch; one more is refused with 503
    max_request_bytes: int = 65536   # a larger request body is refused with 413
    max_search_results: int = 20     # /search's top_k at most


def register() -> None:
    config_schema.register(stage_schemas())
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


def check(config: ServeConfig) -> None:
    """Every server setting in range, or one UserError naming the key."""
    from hybridchat.core.errors import UserError

    for key in ("batch_size", "queue_size", "max_request_bytes", "max_search_results"):
        if getattr(config, key) < 1:
            raise UserError(f"{key} must be >= 1, got {getattr(config, key)}")
    if not 0 <= config.port <= 65535:
        raise UserError(f"port must be in 0..65535 (0: any free port), got {config.port}")
    if config.api_key is not None and not config.api_key.strip():
        raise UserError("api_key is empty: give a key, or null for none")
