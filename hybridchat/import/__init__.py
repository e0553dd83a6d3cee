"""Import a pretrained model as a checkpoint: python -m hybridchat.import SOURCE [key=value ...]

    python -m hybridchat.import SmolLM2-135M-Instruct.Q4_1.gguf run_name=smol
    python -m hybridchat.import ~/models/Qwen2-0.5B-Instruct/ run_name=qwen [overwrite=true]

SOURCE is a GGUF file (llama.cpp's format, architecture llama or qwen2) or a local Hugging Face folder
(config.json, *.safetensors sharded or not, tokenizer.json, the chat template) of model_type llama
(Llama, SmolLM, SmolLM2) or qwen2; one without a chat template (a base model) is imported with
hybridchat's ChatML and a warning. The rest are Hydra overrides of conf/import.yaml: run_name (the
model's own name when left out), overwrite, paths.*. It writes an ordinary checkpoint,
<paths.checkpoints>/<run_name>/pretrained/step_000000, the stage folder stage.source=pretrained
reads, so chat, evaluation and training take it at once (the lines it prints say how). An existing
checkpoint there is kept unless overwrite=true; the new one is written under a temp name and renamed
into place whole, so a failure leaves the old one as it was.

The package is named like the command; `import` being a Python keyword, code imports it with
importlib.import_module("hybridchat.import") (tests do), never with an import statement.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hybridchat.core.errors import UserError, run_hydra_app, run_or_exit
from hybridchat.infra import checkpoint, commands
from hybridchat.infra.config import PathsConfig
from hybridchat.infra.imported import PRETRAINED, ImportedModel, write_checkpoint

USAGE = __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]


@dataclass
class ImportConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: Optional[str] = None     # None: the model's own name (the GGUF's metadata, the folder's name)
    overwrite: bool = False            # replace a checkpoint already imported under run_name


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="import_schema", node=ImportConfig)


def read(source: str) -> ImportedModel:
    """The model at `source`: a folder is a Hugging Face one, a file a GGUF one."""
    path = Path(source)
    if path.is_dir():
        from hybridchat.infra.huggingface import read_folder  # safetensors and transformers' names only here

        return read_folder(path)
    if path.is_file():
        from hybridchat.infra.gguf import read_gguf  # gguf and numpy only here

        return read_gguf(path)
    raise UserError(f"{source}: no such file or folder (give a .gguf file or a Hugging Face model folder)")


def training_overrides(run_name: str) -> list[str]:
    """The train command line that tunes the import: a run that chooses no model= trains the
    architecture of its stage.source checkpoint (hybridchat.train's adopt_source_model)."""
    return [f"run_name={run_name}", "stage=rag", f"stage.source={PRETRAINED}"]


def missing_template_warning(source: str) -> str:
    """What a model without a chat template is imported as: a base model is worth importing (to
    tune it), so it is not refused, but it will be prompted in a format it has not seen."""
    where = ("neither chat_template.jinja nor a chat_template in tokenizer_config.json" if Path(source).is_dir()
             else "no tokenizer.chat_template key")
    return (f"warning: {source} has {where}: it is imported with hybridchat's ChatML template "
            f"(<|im_start|>role\\n...<|im_end|>), the format chat, serve and training prompt in. A base model was "
            f"not trained on it: tune it (the train line below) before trusting its chat replies")


def run(source: str, cfg: ImportConfig) -> Path:
    imported = read(source)
    if imported.chat_template is None:
        print(missing_template_warning(source), file=sys.stderr)
    run_name = cfg.run_name or imported.config["name"]
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise UserError(f"run_name={run_name!r} must be a plain folder name")
    directory = checkpoint.stage_dir(cfg.paths.checkpoints, run_name, PRETRAINED)
    step = write_checkpoint(imported, directory, overwrite=cfg.overwrite)
    c = imported.config
    print(f"imported {imported.source} ({c['n_layer']} layers, d_model {c['n_embd']}, {c['n_head']}/{c['n_kv_head']} "
          f"heads, vocabulary {c['vocab_size']}) -> {step}")
    print(f"  chat:     python -m hybridchat.chat run_name={run_name} checkpoint_stage={PRETRAINED}")
    print(f"  evaluate: python -m hybridchat.evaluate run_name={run_name} checkpoint_stage={PRETRAINED} "
          f"closed_book_stage={PRETRAINED}")
    print(f"  train:    python -m hybridchat.train {' '.join(training_overrides(run_name))}")
    return step


def main(argv: list[str] | None = None) -> None:
    """--help prints usage; no SOURCE, or a user error, is one `error:` line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if not argv or "=" in argv[0]:
        print(f"error: python -m hybridchat.import: the first word is the GGUF file or Hugging Face folder to import "
              f"(got {argv[0] if argv else 'nothing'!r}; see python -m hybridchat.import --help)", file=sys.stderr)
        sys.exit(2)
    register()
    run_hydra_app(lambda: run_or_exit(lambda: run(argv[0], commands.compose("import", "import_schema", ImportConfig,
                                                                            argv[1:]))), argv)
