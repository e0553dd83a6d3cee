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
from typing import Any, Optional

from hydra.conf import RunMode
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from hybridchat.data.world import WorldConfig
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


class ConvertedOutput(str, Enum):
    attention = "attention"  # out_proj = the attention's O ("The Mamba in the Llama")
    zero = "zero"            # out_proj = 0: each converted layer starts as a no-op and grows in


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
    mlp_ratio: int = 4            # MLP hidden = mlp_ratio * n_embd; 0: no MLP at all
    mlp_hidden: Optional[int] = None   # hidden size given directly (Llama's intermediate_size); None: the ratio
    mlp: str = "relu2"            # relu2: c_proj(relu(c_fc x)^2) (nanochat) | swiglu: c_proj(silu(c_gate x) * c_fc x)
    mamba_mlp: bool = True        # MLP after Mamba mixers too (Nemotron-H drops it)
    qk_norm: bool = True          # RMSNorm queries and keys per head after RoPE (nanochat); Llama has none
    norm_weights: bool = False    # learned gains on the block and final RMSNorms (Llama); False: parameter-free
    norm_eps: Optional[float] = None   # eps of every RMSNorm outside Mamba; None: torch's default (dtype's eps)
    embed_norm: bool = True       # RMSNorm the token embeddings before the first block (nanochat; Llama: false)
    tie_embeddings: bool = False  # the LM head is the embedding matrix (SmolLM2); no lm_head.weight then
    attn_rope: bool = True        # hybrid papers often use no positional encoding at all
    rope_base: float = 10000.0
    # Copy from context (hybridchat/model/pointer.py): the output mixes the vocabulary softmax with one
    # attention head's weights over the tokens so far, gated per position. What makes a small model
    # answer from a document it has never seen; the model then returns log-probabilities, not logits.
    pointer: bool = False
    # Tokens after a user message or follow-up query carry whether that request contains them
    # (model/request_match.py): how a small model tells the asked person's document from a namesake's.
    request_match: bool = False
    sequence_len: int = 512
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    vocab_size: Optional[int] = None   # None: take the tokenizer's size
    # Pretrained weights (a GGUF file, or "package:file" inside an installed package), imported
    # into <run>/pretrained/ for stages with stage.source=pretrained. None: trained here.
    pretrained: Optional[str] = None


@dataclass
class GPUConfig:
    name: str = "cpu"
    device: Device = Device.cpu
    dtype: DType = DType.float32       # autocast dtype for matmuls; master weights stay fp32
    memory_gb: float = 0.0
    # Rows per forward pass and rank: a positive int, or "auto": the largest that fits memory_gb by the
    # memory planner (hybridchat.plan), resolved once before training starts.
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
    Each stage option (conf/stage/*.yaml) has its own subclass below for what only it needs."""
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
    matrix_lr: float = 0.02            # Muon, 2-D weights inside blocks
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
    keep_checkpoints: int = 2


@dataclass
class PretrainConfig(StageConfig):
    pass


@dataclass
class MidConfig(StageConfig):
    """Chat format: conversations rendered with the special tokens, loss on assistant tokens."""
    name: str = "mid"
    source: Optional[str] = "pretrain"
    world_conversations: bool = True   # the world's closed-book chats about its training entities
    conversations: Optional[str] = None  # your JSONL of {"messages": [{"role", "content"}, ...]}
    val_fraction: float = 0.05         # share of conversations held out for validation
    eval_questions: int = 100          # closed-book questions answered at each evaluation


@dataclass
class RagConfig(StageConfig):
    """Answer from retrieved documents with a citation, or abstain when they do not hold the answer."""
    name: str = "rag"
    source: Optional[str] = "mid"
    min_documents: int = 1             # documents per training example: uniform in [min, max]
    max_documents: int = 4
    candidates: int = 10               # retrieved per question; distractors come from these
    gold_missing: float = 0.2          # share of answerable examples whose gold document is removed
    unanswerable: float = 0.15         # share of examples about entities that exist nowhere
    # the retrieved question + follow-ups about the same documents: more to learn per document read
    questions_per_example: int = 3
    questions: Optional[str] = None    # your JSONL (question, answers, gold_doc_ids); None: the world's
    val_fraction: float = 0.05         # share of training questions held out for validation loss
    eval_questions: int = 100          # held-out questions answered at each evaluation
    max_answer_tokens: int = 24
    cite_first: bool = True            # "[2] Vellport"; False: "Vellport [2]" (answer, then its source)


@dataclass
class RefragConfig(RagConfig):
    """Multi-hop: the model writes follow-up queries between the query tokens, the engine retrieves
    for them, the model answers with citations across all documents shown (or abstains). The first
    num_steps - rl_steps steps are a supervised warm start on 2-hop traces (plus rag's single-hop
    examples), the last rl_steps are GRPO with the engine in the loop. The rag keys it inherits set
    the single-hop examples and the hop-1 documents of a trace."""
    name: str = "refrag"
    source: Optional[str] = "rag"
    max_hops: int = 2                  # retrievals per question, the question's own included
    hop_documents: int = 2             # documents retrieved per follow-up query
    max_query_tokens: int = 16
    hop_tokens: int = 256              # context kept free for each follow-up hop's documents
    single_hop: float = 0.5            # share of warm-start examples that are rag's single-hop ones
    # share of those (answerable, their document shown) whose reply opens a follow-up query anyway
    # (the opening marker given, not learned), queries the answer it holds and answers from the first
    # documents still: a needless query costs a retrieval, not the answer (a tiny model's needless
    # query is the answer itself, "[1] Soreiport")
    needless_query: float = 0.5
    hop_questions: Optional[str] = None  # your 2-hop JSONL (gold_doc_ids in hop order); None: the world's
    rl_steps: int = 0                  # the last rl_steps of num_steps are GRPO steps
    # GRPO's learning rate, a constant share of the stage's (small: noisy gradients, Muon's fixed-size steps)
    rl_lr_frac: float = 0.1
    group_size: int = 4                # trajectories sampled per question (GRPO group)
    temperature: float = 1.0           # sampling temperature of the rollouts
    kl_coef: float = 0.0               # KL (k3 estimator) to the policy at the start of RL; 0: none
    reward_em: float = 1.0             # reward terms: exact match of the answer
    reward_f1: float = 0.0             # token F1 of the answer
    reward_gold: float = 0.0           # share of the gold documents among those shown
    reward_format: float = 0.0         # well-formed trajectory (queries closed, valid citation or abstention)
    hop_cost: float = 0.0              # subtracted per follow-up retrieval


@dataclass
class DistillConfig(StageConfig):
    """The source checkpoint is the teacher; the run's model (its sizes, with some A letters of the
    block pattern turned into M) is the student, initialised from it and trained to match it."""
    name: str = "distill"
    source: Optional[str] = "pretrain"
    temperature: float = 1.0           # both distributions softened by it; the KL is scaled by its square
    ce_weight: float = 0.0             # loss = KL + ce_weight x next-token cross-entropy on the text
    # + hidden_weight x the converted layers' relative squared error against the teacher's layers, each
    # run on the teacher's hidden state entering it: a signal at every replaced layer, not only at the logits
    hidden_weight: float = 0.0
    # How a converted layer's output projection starts; its in_proj holds Q, K, V either way
    converted_output: ConvertedOutput = ConvertedOutput.attention


@dataclass
class DataConfig:
    name: str = "world"                # world (the `world` node) | text | fineweb_edu
    path: Optional[str] = None         # text: a file or folder of .txt/.jsonl/.parquet
    text_key: str = "text"             # field holding the text in jsonl/parquet
    val_fraction: float = 0.02         # text: share of documents held out for validation
    num_shards: int = 8                # fineweb_edu: shards to download (~100 MB each)
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


STAGE_SCHEMAS = {"pretrain": PretrainConfig, "mid": MidConfig, "rag": RagConfig,
                 "distill": DistillConfig, "refrag": RefragConfig}


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    # conf/stage/<name>.yaml starts with `defaults: [<name>_schema]`: its keys are checked against
    # that stage's own class, so a rag-only key is a typo anywhere else.
    for name, schema in STAGE_SCHEMAS.items():
        store.store(group="stage", name=f"{name}_schema", node=schema)
    if not OmegaConf.has_resolver("hc.run_name"):
        OmegaConf.register_new_resolver("hc.run_name", default_run_name)
        OmegaConf.register_new_resolver("hc.model_choice", model_choice)
        OmegaConf.register_new_resolver("hc.rank_suffix", rank_suffix)
        # Cached: a sweep's launcher resolves hydra.sweep.dir once and Hydra copies the resolver cache
        # into every job's config, so all jobs of one sweep share one folder.
        OmegaConf.register_new_resolver("hc.run_stamp", run_stamp, use_cache=True)
