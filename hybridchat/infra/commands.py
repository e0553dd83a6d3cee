"""Commands of the form `python -m hybridchat.X COMMAND key=value ...` (kb, qa): the first word picks
the command, the rest are Hydra overrides of conf/X.yaml, checked against the command's schema."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from hybridchat.core.errors import run_hydra_app, run_or_exit

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def compose(config_name: str, schema_name: str, schema: type, overrides: list[str]):
    """conf/<config_name>.yaml (whose defaults list names schema_name) with the overrides, as a
    `schema` object."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=schema_name, node=schema)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name, overrides))


def main(program: str, usage: str, commands: tuple[str, ...], run: Callable[[str, list[str]], None],
         interrupted: str, argv: list[str] | None = None) -> None:
    """--help prints usage; a first word that is no command, or a user error, is one `error:` line
    and exit code 2; Ctrl-C says what is left on disk (`interrupted`) and exits 130."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return
    if not argv or argv[0] not in commands:
        print(f"error: python -m {program}: the first word is the command, one of {', '.join(commands)} "
              f"(got {argv[0] if argv else 'nothing'!r}; see python -m {program} --help)", file=sys.stderr)
        sys.exit(2)
    try:
        run_hydra_app(lambda: run_or_exit(lambda: run(argv[0], argv[1:])), argv)
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted}", file=sys.stderr)
        sys.exit(130)
