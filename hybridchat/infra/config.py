"""Typed schema of the Hydra config tree.

Every yaml under conf/ is merged onto these dataclasses (registered in Hydra's ConfigStore as
`base_config`), so a misspelled key or a value of the wrong type fails at compose time with Hydra's
own message naming the key, instead of silently becoming a new, unused key.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional

from hydra.conf import RunMode
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from hybridchat.core.errors import UserError
from hybridchat.data.sources import DataConfig
from hybridchat.data.world import WorldConfig
from hybridchat.model.config import ModelConfig
from hybridchat.retrieval.config import RetrieverConfig


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"   # fp16 is left out on purpose: it needs loss scaling and is slow on CPU


class SSMBackend(str, Enum):
    auto = "auto"    # mamba_ssm kernels on CUDA tensors when they import, else torch
    torch = "torch"  # our chunked SSD scan, runs everywhere
    cuda = "cuda"    # mamba_ssm kernels, fail loudly if missing


class AttentionBackend(str, Enum):
    auto = "auto"            # let SDPA choose (flash / memory-efficient / math)
    flash = "flash"
    efficient = "efficient"
    math = "math"


@dataclass
class GPUConfig:
    name: str = "cpu"
    device: Device = Device.cpu
    dtype: DType = DType.float32       # autocast dtype for matmuls; master weights stay fp32
    memory_gb: float = 0.0
    # Rows per forward pass and rank: a positive int, or "auto": the largest that fits memory_gb by the
    # memory planner (hybridchat.infra.planner), resolved once before training starts.
    micro_batch: Any = 16
    compile: bool = False
    activation_checkpointing: bool = False   # recompute each block's activations in backward
    attention_backend: AttentionBackend = AttentionBackend.auto
    ssm_backend: SSMBackend = SSMBackend.torch
    peak_tflops_bf16: float = 0.0      # for MFU; 0 means unknown (CPU)


class Strategy(str, Enum):
    ddp = "ddp"      # every rank holds the whole model, optimizer state and gradients
    fsdp = "fsdp"    # FSDP2 fully_shard per block: parameters, gradients and optimizer state sharded


@dataclass
class DistributedConfig:
    strategy: Strategy = Strategy.ddp


@dataclass
class StageConfig:
    """What every stage has: where it starts, the optimizer, the schedule, evaluation, checkpoints.
    Each stage option (conf/stage/*.yaml) has its own subclass, next to its stage class
    (hybridchat/training/stages/), for what only it needs."""
    name: str = "pretrain"
    # The checkpoint that initialises this one: a stage of this run (its latest), `pretrained`, or a
    # checkpoint folder of any run (a path: step_* or its stage folder). None: from scratch.
    source: Optional[str] = None
    num_steps: int = 200
    # Tokens per optimizer step across micro-batches and ranks; None: one micro-batch per rank
    # (gpu.micro_batch x model.sequence_len x world size), so any model runs on any preset. Set it
    # (e.g. 524288) to keep the batch fixed across hardware: accumulation follows.
    total_batch_tokens: Optional[int] = None
    warmup_steps: int = 20
    warmdown_ratio: float = 0.3        # last fraction of steps decays linearly to final_lr_frac
    final_lr_frac: float = 0.05
    matrix_lr: float = 0.02            # 2-D weights inside blocks (Muon's, or AdamW's: matrix_optimizer)
    # muon: orthogonalised momentum (pretraining's choice); adamw: AdamW for the matrices too, for
    # fine-tuning a 135M model on CPUs, where Muon's Newton-Schulz iterations (then in bfloat16) cost
    # more than its forward and backward pass (measured on 2 cores, docs/realtext.md)
    matrix_optimizer: str = "muon"
    embedding_lr: float = 0.01         # AdamW
    unembedding_lr: float = 0.004      # AdamW
    scalar_lr: float = 0.004           # AdamW: Mamba's A_log, D, dt_bias, conv, norms
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Stages that train on examples of varying length (mid, rag, refrag's warm start): this many
    # batches' worth of examples are sorted by length and cut into batches, so a batch holds rows of
    # similar length and pads less. 1: batches exactly as shuffled.
    length_grouping: int = 8
    eval_every: int = 25
    eval_batches: int = 8              # validation batches (the same set whatever the world size)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2          # 0: keep every step

    def check(self) -> None:
        """The ranges of the keys every stage has, before anything is built: one line naming the key
        (a negative learning rate was the optimizer's traceback, num_steps=-3 wrote step_-00003)."""
        at_least = {"num_steps": 1, "warmup_steps": 0, "length_grouping": 1, "eval_every": 1, "eval_batches": 1,
                    "checkpoint_every": 1, "keep_checkpoints": 0, "matrix_lr": 0, "embedding_lr": 0,
                    "unembedding_lr": 0, "scalar_lr": 0, "weight_decay": 0}
        for key, low in at_least.items():
            if getattr(self, key) < low:
                raise UserError(f"stage.{key}={getattr(self, key)} must be >= {low}")
        for key in ("warmdown_ratio", "final_lr_frac"):
            if not 0 <= getattr(self, key) <= 1:
                raise UserError(f"stage.{key}={getattr(self, key)} must be in [0, 1]")
        if self.matrix_optimizer not in ("muon", "adamw"):
            raise UserError(f"stage.matrix_optimizer={self.matrix_optimizer!r}: choose muon or adamw")
        if not self.grad_clip > 0:
            raise UserError(f"stage.grad_clip={self.grad_clip} must be > 0")
        if self.total_batch_tokens is not None and self.total_batch_tokens < 1:
            raise UserError(f"stage.total_batch_tokens={self.total_batch_tokens} must be >= 1 (or null)")


@dataclass
class LoggerConfig:
    name: str = "none"                 # none | wandb
    project: str = "hybridchat"
    entity: Optional[str] = None
    mode: Optional[str] = None         # None: $WANDB_MODE if set, else offline
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    """Relative paths resolve against the directory you launch from (Hydra does not chdir)."""
    outputs: str = "outputs"
    checkpoints: str = "${paths.outputs}/checkpoints"
    cache: str = "${paths.outputs}/cache"    # tokenizers, knowledge bases, tokenized data
    data: str = "${paths.outputs}/data"      # downloaded datasets (fineweb_edu)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    gpu: GPUConfig = field(default_factory=GPUConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Checkpoints live in ${paths.checkpoints}/${run_name}/<stage>/, independent of Hydra's run dir,
    # so later stages find their source. Default: the model choice (+ the job's overrides in a sweep).
    run_name: str = "${hc.run_name:}"
    seed: int = 1337
    resume: bool = False
    overwrite: bool = False            # a new run may replace an earlier run's checkpoints of its stage
    progress: bool = True              # tqdm progress bar on rank 0


def default_run_name() -> str:
    """The model choice; in a multirun, plus the job's overrides, so sweep jobs never share a
    checkpoint folder (resume/run_name are excluded from override_dirname in conf/hydra/default.yaml)."""
    hc = HydraConfig.get()
    name = hc.runtime.choices.get("model") or "model"
    if hc.mode == RunMode.MULTIRUN:
        name += "/" + (hc.job.override_dirname or f"job{hc.job.num}").replace("/", "_")
    return name


def model_choice() -> str:
    """The `model` option chosen, alone: what the evaluator and chat call a run (their sweeps over
    retrievers must not rename the run they read)."""
    return HydraConfig.get().runtime.choices.get("model") or "model"


def run_stamp() -> str:
    """The run, sweep and plan folders' name: <date>/<time to the millisecond> (two runs started
    within one second wrote into one folder), except under torchrun, where every rank resolves this
    itself and two ranks could straddle a moment: there all ranks share torchrun's run id (a UUID
    with --standalone) or, failing that, their agent's pid (the ranks' common parent)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        return f"torchrun-{run_id if run_id != 'none' else os.getppid()}"
    now = time.time()
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def rank_suffix() -> str:
    """'' on rank 0, '_rank<N>' elsewhere: each torchrun / SLURM / submitit task keeps its own .hydra
    dir and log file (read from the launcher's environment: torch.distributed is not set up yet)."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if var in os.environ:
            rank = int(os.environ[var])
            return "" if rank == 0 else f"_rank{rank}"
    return ""


def register(stage_schemas: Mapping[str, type[StageConfig]]) -> None:
    """The schema and the resolvers in Hydra's stores; stage_schemas: each stage's config class by name
    (hybridchat.training.stages.stage_schemas: the stages live in a higher layer)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    # conf/stage/<name>.yaml starts with `defaults: [<name>_schema]`: its keys are checked against
    # that stage's own class, so a rag-only key is a typo anywhere else.
    for name, schema in stage_schemas.items():
        store.store(group="stage", name=f"{name}_schema", node=schema)
    if not OmegaConf.has_resolver("hc.run_name"):
        OmegaConf.register_new_resolver("hc.run_name", default_run_name)
        OmegaConf.register_new_resolver("hc.model_choice", model_choice)
        OmegaConf.register_new_resolver("hc.rank_suffix", rank_suffix)
        # Cached: a sweep's launcher resolves hydra.sweep.dir once and Hydra copies the resolver cache
        # into every job's config, so all jobs of one sweep share one folder.
        OmegaConf.register_new_resolver("hc.run_stamp", run_stamp, use_cache=True)
