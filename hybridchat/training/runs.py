"""A trained run as one object, loaded from one checkpoint step folder: the model and tokenizer, the
metadata, and the settings the run was trained with, typed by the config schema.

    run = load_run(checkpoint.find(paths.checkpoints, "hybrid_tiny", "rag"))
    run.model, run.tokenizer, run.config.model.sequence_len, run.config.stage, run.world

The only reader of a checkpoint's meta["config"] (the resolved training config the loop saves):
chat, evaluation, the benchmarks and the distill stage's teacher all come through here, so the world,
the retriever and the stage settings of a checkpoint are parsed one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.data.world import World
from hybridchat.infra import checkpoint
from hybridchat.infra.build import build_model
from hybridchat.infra.config import Config, GPUConfig, PathsConfig, StageConfig
from hybridchat.infra.context import world_collection
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.rag.abstention import Calibration, is_threshold
from hybridchat.rag.answer import RANK_ORDER, READINGS, TOGETHER
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.training.stages import stage_schemas

if TYPE_CHECKING:
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

CHECKPOINT = "checkpoint"  # abstain_threshold's default: the checkpoint's own


@dataclass
class RunReaderConfig:
    """The schema every app that reads a trained run shares (evaluate, chat): training's groups, and
    the run it reads named the same way."""
    model: ModelConfig = field(default_factory=ModelConfig)  # names the run only: weights bring their own
    gpu: GPUConfig = field(default_factory=GPUConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "${hc.model_choice:}"      # the `model` option chosen (a sweep over retrievers keeps it)
    # Answer or abstain: abstain also where the confidence 1 - P(ABSTAIN) is below this. A number in
    # [0, 1]; null: only where the model writes ABSTAIN; checkpoint: the threshold stored with the
    # checkpoint (stage.target_false_abstention, evaluate calibrate=true), null where it has none.
    abstain_threshold: Any = CHECKPOINT
    # How a question's retrieved documents are read (single-hop): together, all in one prompt; or
    # rank_order, each alone in rank order, answering from the first one it does not abstain on
    # (hybridchat/rag/answer.py RankOrderReader).
    reading: str = TOGETHER


def threshold_setting(value: Any) -> float | str | None:
    """abstain_threshold as given, or one UserError saying what it may be."""
    if value is None or value == CHECKPOINT or is_threshold(value):
        return value
    raise UserError(f"abstain_threshold={value!r} must be a number in [0, 1], null (abstain only where the model "
                    f"writes ABSTAIN) or {CHECKPOINT} (the threshold stored with the checkpoint; the default)")


def reading_setting(value: str) -> str:
    """reading as given, or one UserError saying what it may be."""
    if value in READINGS:
        return value
    raise UserError(f"reading={value!r} must be {TOGETHER} (all retrieved documents in one prompt; the default) or "
                    f"{RANK_ORDER} (each document alone, in rank order: the answer is read from the first one the "
                    f"model does not abstain on)")


@dataclass
class Run:
    path: Path                # the step folder
    model: HybridLM           # in eval mode
    tokenizer: Tokenizer
    meta: dict[str, Any]      # meta.json as written (step, stage, architecture, ...)
    # meta["config"] typed; a section the checkpoint lacks (an imported model has only `model`) is the
    # schema's default, so its world is the default world and its retriever kind "none".
    config: Config

    @property
    def stage(self) -> StageConfig:
        """The stage settings it was trained with (RagConfig, RefragConfig, ...: its stage's schema)."""
        return self.config.stage

    @property
    def retriever(self) -> RetrieverConfig:
        """The retriever settings it was trained with."""
        return self.config.retriever

    @cached_property
    def calibration(self) -> Calibration | None:
        """The abstention threshold stored with the checkpoint, as chosen (None: it has none)."""
        record = self.meta.get("abstention")
        if record is None:
            return None
        try:
            return Calibration.from_meta(record)
        except ValueError as e:
            raise UserError(f"checkpoint metadata {self.path / 'meta.json'}: {e}") from None

    def abstain_threshold(self, setting: Any = CHECKPOINT) -> float | None:
        """The threshold to answer with: `setting` (the apps' abstain_threshold) where it is a number
        or None; the stored one for "checkpoint" (None where there is none)."""
        if threshold_setting(setting) != CHECKPOINT:
            return setting
        return self.calibration.threshold if self.calibration is not None else None

    def coverage_exponent(self, setting: Any = CHECKPOINT) -> float:
        """How much the documents' coverage of a question weighs in the decision (rag/coverage.py): the
        stored calibration's, where its threshold is the one answered with; 0 otherwise (a threshold
        given as a number is one on the model's confidence alone)."""
        if threshold_setting(setting) != CHECKPOINT or self.calibration is None:
            return 0.0
        return self.calibration.coverage_exponent

    @cached_property
    def world(self) -> World:
        """The synthetic world it was trained on, generated on first use (seconds for 1000 people)."""
        return World.generate(self.config.world)

    def knowledge_base(self, retriever: RetrieverConfig, cache_dir: str | Path, progress: bool = True) -> KnowledgeBase:
        """retriever.kb_dir, else this run's world's documents (indexed under cache_dir on first use)."""
        # Imported here, as in RunContext.knowledge_base: the retrieval stack is half a second of imports.
        from hybridchat.retrieval.factory import open_knowledge_base

        return open_knowledge_base(retriever, cache_dir, self._world_collection(), progress)

    def build_retriever(self, retriever: RetrieverConfig, cache_dir: str | Path, progress: bool = True):
        """The retriever `retriever` over knowledge_base(...); None for kind "none"."""
        from hybridchat.retrieval.factory import build_retriever  # lazily: see knowledge_base

        return build_retriever(retriever, cache_dir, self._world_collection(), progress)

    def _world_collection(self):
        # The world's index name, and its documents from the world this run already generated.
        return world_collection(self.config.world)[0], lambda: self.world.documents()


def parse_config(values: dict[str, Any], where: Path) -> Config:
    """meta["config"] on the schema: the stage section on its own stage's class, so a refrag
    checkpoint's max_hops is typed. A key this hybridchat does not know is one UserError."""
    stage = stage_schemas().get(str((values.get("stage") or {}).get("name")), StageConfig)
    # The schema's run_name default is a Hydra resolver (the model choice), which only a composing app
    # can resolve; a checkpoint without one (an imported model's) is named by its folder.
    named = {"run_name": where.parent.parent.name}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config),
                                                   {"stage": OmegaConf.structured(stage)}, named, values))
    except OmegaConfBaseException as e:
        raise UserError(f"checkpoint {where}: config in meta.json does not fit this hybridchat "
                        f"({str(e).splitlines()[0]})") from e


def load_run(path: str | Path, device: str | torch.device = "cpu", ssm_backend: str = "torch") -> Run:
    """The run whose checkpoint is the step folder `path`, from that folder alone: the model config
    comes from meta.json, the tokenizer from the tokenizer.json saved beside the weights."""
    path = Path(path)
    meta = checkpoint.read_meta(path)
    values = meta.get("config", {})
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict) \
            or not (path / "tokenizer.json").is_file():
        raise UserError(f"checkpoint {path} lacks its model config or tokenizer.json (saved by an older "
                        f"hybridchat?); it cannot be loaded on its own")
    config = parse_config(values, path)
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    model = build_model(config.model, meta["architecture"]["vocab_size"], tokenizer, ssm_backend=ssm_backend)
    checkpoint.load(path, model, None, tokenizer.fingerprint)
    model.to(device).eval()
    return Run(path, model, tokenizer, meta, config)
