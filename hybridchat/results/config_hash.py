"""A record's config hash: what its Hydra commands compose to, as one sha256.

Each command (`python -m hybridchat.<app> <overrides>`) is composed the way the app composes it
(conf/ plus the app's typed schema, offline, nothing run), resolved, and stripped of the keys that
say where output goes and how it is shown, not what is computed (NOT_HASHED: a run under another
output folder computes the same thing). The hash is sha256 of the JSON of the list of
{"app", "config"} in the record's order, keys sorted. A changed default, a new key or a renamed one
changes it: stale means "today's code composes something else for this command", to be measured
again (or the record's status said), not "the numbers are wrong".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from hybridchat.core.errors import UserError
from hybridchat.results.records import AppConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAMES = {"train": "config", "evaluate": "eval", "plan": "plan"}
NOT_HASHED = ("paths", "logger", "progress", "resume", "overwrite")
# Keys added after records were measured (their path in the composed config), at the value that
# computes exactly what the code computed before they existed: left out of the hash at that value, so
# adding an option (for an imported model) does not mark every record stale; set to anything else,
# they are hashed like any key.
ADDED_AT_NO_EFFECT = {("model", "qkv_bias"): False, ("stage", "gold_position"): "uniform",
                      ("reading",): "together", ("stage", "both_gold"): 0.0,
                      ("stage", "bridge_questions"): 0.0}


def register_schemas() -> None:
    """The apps' typed schemas in Hydra's ConfigStore, as each app registers them before composing."""
    from hybridchat.evaluate import register as register_eval
    from hybridchat.plan import register as register_plan

    register_eval()   # the training schema (every stage's) and the evaluation app's
    register_plan()


def composed(config_name: str, overrides: Iterable[str], config_dir: Path = CONF_DIR) -> dict[str, Any]:
    """conf/<config_name>.yaml with the overrides, resolved as a run of it would resolve it (HydraConfig
    set: run_name's default reads the model choice; paths by name), without the hydra node and NOT_HASHED."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = "."
            cfg.hydra.job.num = 0
            cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.pop("hydra")
            # Keys that interpolate a path (a stage.source under ${paths.checkpoints}) resolve to its
            # name, not to where this machine keeps it.
            for key in cfg.get("paths") or {}:
                cfg.paths[key] = f"<paths.{key}>"
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for (*sections, key), neutral in ADDED_AT_NO_EFFECT.items():
            node = resolved
            for section in sections:
                node = node.get(section) if isinstance(node, dict) else None
            if isinstance(node, dict) and node.get(key, neutral) == neutral:
                node.pop(key, None)
        return {key: value for key, value in resolved.items() if key not in NOT_HASHED}
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{config_name}.yaml with {' '.join(overrides) or 'no overrides'} does not compose: {first}") \
            from None
    finally:
        GlobalHydra.instance().clear()


def config_hash(configs: Iterable[AppConfig], config_dir: Path = CONF_DIR) -> str:
    resolved = [{"app": c.app, "config": composed(CONFIG_NAMES[c.app], c.overrides, config_dir)} for c in configs]
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
