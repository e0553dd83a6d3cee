"""A checkpoint opened to answer questions, as the apps that answer (chat, serve) open it.

One place for what they share: the keys that name the checkpoint and shape the answers
(AnsweringConfig), which retriever and knowledge base answer (the checkpoint's own unless told),
the abstention threshold, and whether answers are single-hop (Answerer; RankOrderReader with
reading=rank_order) or multi-hop (MultiHop).
The apps differ only in how a question arrives and how the answer is shown.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from hybridchat.core.errors import UserError
from hybridchat.infra import checkpoint
from hybridchat.rag.answer import RANK_ORDER, TOGETHER, Answerer, RankOrderReader
from hybridchat.rag.coverage import Coverage
from hybridchat.rag.multihop import MultiHop, Search
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.retrieval.knowledge_base import KnowledgeBase, kind_for, needed_indexes
from hybridchat.training.runs import Run, RunReaderConfig, load_run, reading_setting, threshold_setting
from hybridchat.training.stages import answering_stage


@dataclass
class AnsweringConfig(RunReaderConfig):
    # None: the one checkpoint that answers single-hop, multi-hop and unanswerable questions (the run's
    # refrag) where the run has one, else the single-hop one (rag)
    checkpoint_stage: Optional[str] = None
    step: Optional[int] = None                 # None: the stage's latest checkpoint
    checkpoint: Optional[str] = None           # a step folder, instead of run_name/checkpoint_stage/step
    max_answer_tokens: int = 48
    max_hops: Optional[int] = None             # None: the checkpoint's stage.max_hops (refrag), else 1


def retriever_settings(cfg: DictConfig, config: AnsweringConfig, run: Run) -> RetrieverConfig:
    """retriever=<option>: that option's settings, as evaluate reads them. No option: the settings
    the checkpoint was trained with (bm25 if it had none) over the world's documents at top-3, with
    each retriever.* key given on the command line on top."""
    hc = HydraConfig.get()
    if hc.runtime.choices.get("retriever") is not None:
        return config.retriever
    trained = run.retriever
    settings = OmegaConf.structured(replace(trained, kind=trained.kind if trained.kind != "none" else "bm25",
                                            kb_dir=None, top_k=RetrieverConfig.top_k))
    for override in OverridesParser.create().parse_overrides(list(hc.overrides.task)):
        key = override.key_or_group
        if key.startswith("retriever."):
            OmegaConf.update(settings, key.removeprefix("retriever."), OmegaConf.select(cfg, key))
    return served_by_your_knowledge_base(OmegaConf.to_object(settings))


def served_by_your_knowledge_base(settings: RetrieverConfig) -> RetrieverConfig:
    """The checkpoint's retriever, unless your knowledge base (retriever.kb_dir) lacks its index: then
    the retriever the knowledge base has, said on stderr (a bm25 index was added to a dense-only one)."""
    if settings.kb_dir is None:
        return settings
    have = KnowledgeBase.read_manifest(settings.kb_dir)["indexes"]
    missing = [n for n in needed_indexes(settings) if n not in have]
    if not missing or not have:
        return settings
    kind = kind_for(have)
    print(f"retriever={kind}: {settings.kb_dir} has no {', '.join(missing)} index for the checkpoint's "
          f"retriever={settings.kind} (name retriever={settings.kind} to add it)", file=sys.stderr)
    return replace(settings, kind=kind)


@dataclass
class Assistant:
    """A loaded run with its retriever (None: closed-book) and the settings its answers follow."""
    path: Path
    run: Run
    settings: RetrieverConfig
    retriever: Any
    threshold: Optional[float]
    max_hops: int
    max_answer_tokens: int
    batch_size: int = 1
    reading: str = TOGETHER
    coverage_exponent: float = 0.0  # the decision's weight on retrieval coverage (rag/coverage.py)
    _made: dict = field(default_factory=dict, repr=False)

    @cached_property
    def coverage(self) -> Coverage | None:
        """The knowledge base's coverage weights, where the decision weighs coverage."""
        if not self.coverage_exponent or self.retriever is None:
            return None
        return Coverage.of(self.retriever.documents)

    @property
    def _decision(self) -> dict:
        """How answers are decided: the threshold, and the coverage it weighs."""
        return dict(threshold=self.threshold, coverage=self.coverage,
                    coverage_exponent=self.coverage_exponent if self.coverage is not None else 0.0)

    @property
    def max_context(self) -> int:
        return self.run.config.model.sequence_len

    def answerer(self, max_answer_tokens: int | None = None) -> Answerer:
        """The single-hop answerer (also the closed-book one) for replies of up to max_answer_tokens
        (default: the configured number). Made once per length: the prompt's room depends on it."""
        n = max_answer_tokens or self.max_answer_tokens
        if ("answerer", n) not in self._made:
            self._made["answerer", n] = Answerer(self.run.model, self.run.tokenizer, self.max_context,
                                                 max_answer_tokens=n, batch_size=self.batch_size,
                                                 **self._decision)
        return self._made["answerer", n]

    def reader(self, max_answer_tokens: int | None = None) -> RankOrderReader | None:
        """The reader of each retrieved document alone in rank order (reading=rank_order); None where
        documents are read together or there are none (closed-book)."""
        if self.retriever is None or self.reading != RANK_ORDER:
            return None
        return RankOrderReader(self.answerer(max_answer_tokens))

    def multihop(self, max_answer_tokens: int | None = None) -> MultiHop | None:
        """The multi-hop answerer, None where answers are single-hop (closed-book, or max_hops 1)."""
        if self.retriever is None or self.max_hops < 2:
            return None
        n = max_answer_tokens or self.max_answer_tokens
        if ("multihop", n) not in self._made:
            # top_k documents per retrieval, the query and context settings the checkpoint was trained
            # with (else the multi-hop stage's defaults)
            defaults, stage = answering_stage(2).config_class, self.run.stage
            self._made["multihop", n] = MultiHop(
                self.run.model, self.run.tokenizer, Search(self.retriever, self.settings.top_k), self.max_context,
                max_hops=self.max_hops,
                max_query_tokens=getattr(stage, "max_query_tokens", defaults.max_query_tokens),
                max_answer_tokens=n, hop_tokens=getattr(stage, "hop_tokens", defaults.hop_tokens),
                batch_size=self.batch_size, **self._decision)
        return self._made["multihop", n]

    def fit_question(self, question: str, max_answer_tokens: int | None = None) -> str:
        """The question cut to what the prompt holds (unchanged where it fits)."""
        return (self.multihop(max_answer_tokens) or self.answerer(max_answer_tokens)).fit_question(question)

    def describe(self) -> str:
        """One line: which checkpoint answers, and how."""
        how = "closed-book" if self.retriever is None else f"top-{self.settings.top_k} retrieval"
        if self.retriever is not None and self.max_hops > 1:
            how += f", up to {self.max_hops} hops"
        if self.reader() is not None:
            how += ", each document read alone in rank order"
        if self.threshold is not None:
            weighed = f" x coverage^{self.coverage_exponent:g}" if self.coverage is not None else ""
            how += f", abstains below confidence{weighed} {self.threshold:.4g}"
        return f"{self.path} ({how})"


def default_stage(checkpoints: str, run_name: str) -> str:
    """The stage chat and serve answer with when none is named: the multi-hop stage's checkpoint, which
    answers at once where the first documents hold the answer and queries where they name a bridge,
    where the run has one; else the single-hop stage's."""
    multi_hop = answering_stage(2).name
    if checkpoint.latest(checkpoint.stage_dir(checkpoints, run_name, multi_hop)) is not None:
        return multi_hop
    return answering_stage(1).name


def open_assistant(cfg: DictConfig, config: AnsweringConfig, batch_size: int = 1, progress: bool = False) -> Assistant:
    """The checkpoint the app's keys name, loaded, with its retriever; every bad setting is one UserError,
    raised before the model loads where it can be."""
    threshold_setting(config.abstain_threshold)
    reading_setting(config.reading)
    if config.max_hops is not None and config.max_hops < 1:
        raise UserError(f"max_hops must be >= 1, got {config.max_hops}")
    if config.max_answer_tokens < 1:
        raise UserError(f"max_answer_tokens must be >= 1, got {config.max_answer_tokens}")
    path = Path(config.checkpoint) if config.checkpoint else checkpoint.find(
        config.paths.checkpoints, config.run_name,
        config.checkpoint_stage or default_stage(config.paths.checkpoints, config.run_name), config.step)
    run = load_run(path, device=config.gpu.device.value)
    settings = retriever_settings(cfg, config, run)
    if settings.top_k < 1:
        raise UserError(f"retriever.top_k must be >= 1, got {settings.top_k}")
    max_hops = config.max_hops if config.max_hops is not None else getattr(run.stage, "max_hops", 1)
    if max_hops < 1:
        raise UserError(f"max_hops must be >= 1, got {max_hops}")
    if config.reading == RANK_ORDER and max_hops > 1 and settings.kind != "none":
        raise UserError(f"reading={RANK_ORDER} answers from one document read alone, but {path} answers multi-hop "
                        f"(max_hops={max_hops}): set max_hops=1, or leave reading at together")
    retriever = run.build_retriever(settings, config.paths.cache, progress=progress)
    assistant = Assistant(path, run, settings, retriever, run.abstain_threshold(config.abstain_threshold), max_hops,
                          config.max_answer_tokens, batch_size, config.reading,
                          run.coverage_exponent(config.abstain_threshold))
    if not assistant.fit_question("?"):  # else every question is cut to nothing, or refused by serve
        raise UserError(f"max_answer_tokens={config.max_answer_tokens}"
                        f"{f' with max_hops={max_hops}' if assistant.multihop() else ''} leaves no room for a "
                        f"question in the model's {assistant.max_context}-token context: give fewer")
    return assistant

