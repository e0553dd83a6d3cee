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
from typing import Optional

from hydra.conf import RunMode
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

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
class ModelConfig:
    name: str = "hybrid_tiny"
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    # Letters (A = attention, M = Mamba-2) tiled to n_layer or given in full, or a preset name
    # (all_attention, all_mamba, alternating, early_attention_late_mamba, jamba, nemotron).
    block_pattern: str = "alternating"
    mlp_ratio: int = 4
    mamba_mlp: bool = True        # MLP after Mamba mixers too (Nemotron-H drops it)
    attn_rope: bool = True        # hybrid papers often use no positional encoding at all
    rope_base: float = 10000.0
    sequence_len: int = 256
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    vocab_size: Optional[int] = None   # None: take the tokenizer's size


@dataclass
class GPUConfig:
    name: str = "cpu"
    device: Device = Device.cpu
    dtype: DType = DType.float32       # autocast dtype for matmuls; master weights stay fp32
    memory_gb: float = 0.0
    micro_batch: int = 32
    compile: bool = False
    attention_backend: AttentionBackend = AttentionBackend.auto
    ssm_backend: SSMBackend = SSMBackend.torch
    peak_tflops_bf16: float = 0.0      # for MFU; 0 means unknown (CPU)


@dataclass
class StageConfig:
    name: str = "pretrain"
    source: Optional[str] = None       # stage whose final checkpoint initialises this one
    num_steps: int = 200
    # Tokens per optimizer step across micro-batches and ranks; None: one micro-batch per rank
    # (gpu.micro_batch x model.sequence_len x world size), so any model runs on any preset.
    total_batch_tokens: Optional[int] = None
    warmup_steps: int = 20
    warmdown_ratio: float = 0.3        # last fraction of steps decays linearly to final_lr_frac
    final_lr_frac: float = 0.05
    matrix_lr: float = 0.02            # Muon, 2-D weights inside blocks
    embedding_lr: float = 0.01         # AdamW
    unembedding_lr: float = 0.004      # AdamW
    scalar_lr: float = 0.004           # AdamW: Mamba's A_log, D, dt_bias, conv, norms
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2


@dataclass
class DataConfig:
    name: str = "world"                # world | text | fineweb_edu
    path: Optional[str] = None         # text: a file or folder of .txt/.jsonl/.parquet
    text_key: str = "text"             # field holding the text in jsonl/parquet
    val_fraction: float = 0.02         # text: share of documents held out for validation
    num_shards: int = 8                # fineweb_edu: shards to download (~100 MB each)
    world_seed: int = 0
    world_people: int = 1000
    world_texts_per_entity: int = 6    # differently phrased pretraining texts per entity (max 6)
    tokenizer_vocab_size: int = 4096
    tokenizer_train_chars: int = 20_000_000


@dataclass
class LoggerConfig:
    name: str = "none"                 # none | wandb
    project: str = "hybridchat"
    entity: Optional[str] = None
    mode: Optional[str] = None         # None: $WANDB_MODE if set, else offline
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    root: str = "."
    outputs: str = "outputs"
    checkpoints: str = "outputs/checkpoints"
    cache: str = "outputs/cache"
    data: str = "outputs/data"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    gpu: GPUConfig = field(default_factory=GPUConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "default"
    seed: int = 1337
    resume: bool = False
    progress: bool = True              # tqdm progress bar on rank 0


def default_run_name() -> str:
    """The model choice; in a multirun, plus the job's overrides, so sweep jobs never share a
    checkpoint folder (resume/run_name are excluded from override_dirname in conf/config.yaml)."""
    hc = HydraConfig.get()
    name = hc.runtime.choices.get("model") or "model"
    if hc.mode == RunMode.MULTIRUN:
        name += "/" + (hc.job.override_dirname or f"job{hc.job.num}").replace("/", "_")
    return name


def run_stamp() -> str:
    """The run folder's name: <date>/<time>, except under torchrun, where every rank resolves this
    itself and two ranks could straddle a second: there all ranks share torchrun's run id (a UUID
    with --standalone) or, failing that, their agent's pid (the ranks' common parent)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        return f"torchrun-{run_id if run_id != 'none' else os.getppid()}"
    return time.strftime("%Y-%m-%d/%H-%M-%S")


def rank_suffix() -> str:
    """'' on rank 0, '_rank<N>' elsewhere: each torchrun / SLURM / submitit task keeps its own .hydra
    dir and log file (read from the launcher's environment: torch.distributed is not set up yet)."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if var in os.environ:
            rank = int(os.environ[var])
            return "" if rank == 0 else f"_rank{rank}"
    return ""


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("hc.run_name"):
        OmegaConf.register_new_resolver("hc.run_name", default_run_name)
        OmegaConf.register_new_resolver("hc.rank_suffix", rank_suffix)
        OmegaConf.register_new_resolver("hc.run_stamp", run_stamp, use_cache=True)
