"""The memory planner: what a training run needs per GPU, the largest micro-batch that fits, and what
to change when nothing fits (`python -m hybridchat.plan` prints it; training calls
`resolve_micro_batch` when gpu.micro_batch is `auto`).

Per GPU count and strategy (DDP, FSDP): parameters by block type; memory for weights, gradients,
optimizer state (Muon momentum on block matrices, AdamW moments on the rest) and activations at
model.sequence_len; the largest micro-batch that fits; the gradient accumulation that follows; and
tokens/s at a stated MFU.

Memory is a formula in the model's sizes, not a measurement: per token and block, the bytes PyTorch
saves for backward in this project's own forward (counted once with saved_tensors_hooks on the tiny
models, fp32 and bf16 autocast; tests/test_plan.py checks the total against measured peak memory).
FSDP's terms follow what FSDP2 gathers and holds when (fsdp_gathered; tests/test_plan_fsdp.py measures
them on 2 ranks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from hybridchat.core.errors import UserError
from hybridchat.data.sources import DataConfig
from hybridchat.infra.config import Config, GPUConfig, StageConfig
from hybridchat.infra.runtime import grad_accum_steps
from hybridchat.model.blocks import expand_pattern
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM

GiB = 2**30
FP32 = 4
# Beyond the tensors counted here: the CUDA context, cuBLAS/NCCL workspaces (a fixed amount) and the
# caching allocator's fragmentation (a fraction of what is allocated). Stated, not measured on a GPU.
OVERHEAD_FIXED = 1 * GiB
OVERHEAD_FRACTION = 0.10
# Activation checkpointing recomputes each block's forward in backward: 8 instead of 6 FLOPs per
# parameter and token of hardware work for the same model FLOPs.
RECOMPUTE_FACTOR = 8 / 6


@dataclass(frozen=True)
class Setup:
    """One way of running: how many GPUs, how they share the model, the micro-batch, recompute."""
    n_gpus: int
    strategy: str                  # ddp | fsdp
    micro_batch: int
    activation_checkpointing: bool

    def describe(self) -> str:
        ways = "1 GPU" if self.n_gpus == 1 else f"{self.strategy.upper()} x{self.n_gpus}"
        return ways + (", act. ckpt" if self.activation_checkpointing else "")


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU. Their plain sum is the estimate: during backward gradients grow while
    activations are freed, and with accumulation gradients are held through the next forward, so
    adding both is a small overestimate at one micro-batch per step and right with accumulation."""
    weights: int        # fp32 master weights (FSDP: the shard, plus gathered blocks and the root: fsdp_gathered)
    grads: int          # fp32 gradients (DDP over >1 GPU: plus its bucket copy; FSDP: shard + fsdp_gathered)
    optimizer: int      # Muon momentum (1 x fp32) on block matrices (or AdamW's 2), AdamW moments on the rest
    activations: int    # saved for backward, bf16 weight copies under autocast, the loss's transients

    @property
    def tensors(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def overhead(self) -> int:
        return OVERHEAD_FIXED + int(OVERHEAD_FRACTION * self.tensors)

    @property
    def total(self) -> int:
        return self.tensors + self.overhead


@dataclass
class Row:
    setup: Setup
    memory: Memory
    fits: bool
    max_micro_batch: int           # 0: not even one sequence fits this way
    grad_accum: int | None         # None: stage.total_batch_tokens does not divide at this micro-batch
    tokens_per_s: float | None     # None: the preset states no peak TFLOP/s (CPU)


@dataclass
class Plan:
    model: str
    gpu: str
    vocab_size: int
    sequence_len: int
    dtype: str
    ssm_kernels: bool
    capacity_bytes: int
    mfu: float
    params: dict[str, int]             # by block type
    activation_bytes_per_token: dict[str, float]   # by block type, all layers
    rows: list[Row] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)  # when the configured run does not fit


@dataclass(frozen=True)
class Sizes:
    """What the formulas need from the model, counted on the meta device (no memory)."""
    params: dict[str, int]     # by block type
    total: int
    matrix: int                # Muon's share: 2-D matrices inside blocks
    matmul: int                # weights a bf16 autocast copies for its matmuls (block matrices, head, convs)
    largest_block: int         # an FSDP unit
    root: int                  # FSDP root: embedding, final norm, head
    pattern: str


def model_sizes(cfg: ModelConfig, vocab_size: int) -> Sizes:
    with torch.device("meta"):
        lm = HybridLM(cfg, vocab_size)
    params = {"embedding": lm.wte.weight.numel(),
              "lm_head": 0 if lm.lm_head is None else lm.lm_head.weight.numel()}
    for block in lm.blocks:
        kind = {"A": "attention", "M": "mamba"}[block.kind]
        params[kind] = params.get(kind, 0) + sum(p.numel() for p in block.mixer.parameters())
        if block.mlp is not None:
            params["mlp"] = params.get("mlp", 0) + sum(p.numel() for p in block.mlp.parameters())
    if lm.pointer is not None:
        params["pointer"] = sum(p.numel() for p in lm.pointer.parameters())
    if lm.request_match is not None:
        params["request match"] = lm.request_match.weight.numel()
    total = lm.num_params()
    params["norms"] = total - sum(params.values())
    groups = lm.param_groups()
    matrix = sum(p.numel() for p in groups["matrix"])
    convs = sum(b.mixer.conv1d.weight.numel() for b in lm.blocks if b.kind == "M")
    head = (lm.lm_head or lm.wte).weight.numel()
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in lm.blocks]
    return Sizes(params={k: v for k, v in params.items() if v}, total=total, matrix=matrix,
                 matmul=matrix + convs + head, largest_block=max(block_sizes), root=total - sum(block_sizes),
                 pattern=lm.pattern)


def activation_bytes_per_token(cfg: ModelConfig, vocab_size: int, autocast: bool, ssm_kernels: bool,
                               checkpointing: bool = False) -> dict[str, float]:
    """Bytes saved for backward per token of a micro-batch, by block type (all layers of that type).

    `a` is the activation width (2 under bf16 autocast, 4 in fp32); the residual stream, norm
    statistics, SSM decays and carried states stay fp32 (`FP32`). Under autocast every matmul casts
    its input itself, so an input read by k linears is saved k times (once, shared, in fp32). With
    checkpointing, a block keeps only its fp32 input; one block at a time is recomputed in backward
    (counted under "recompute")."""
    a = 2 if autocast else FP32
    d, V = cfg.n_embd, vocab_size
    hd = d // cfg.n_head
    kv = cfg.n_kv_head * hd

    def linear_inputs(width: int, readers: int) -> float:
        return readers * width * a if autocast else width * FP32

    norm = FP32 * (d + 1)  # an RMSNorm keeps its fp32 input and one rstd per token
    attention = (linear_inputs(d, 3) + a * (d + 2 * kv)          # q, k, v inputs; SDPA's q, k, v
                 + 2 * a * d + FP32 * cfg.n_head)                  # SDPA output, c_proj input; logsumexp
    if cfg.qk_norm:  # normalised in fp32 (autocast): inputs and rstd of q and k
        attention += FP32 * (d + kv + cfg.n_head + cfg.n_kv_head)

    di = cfg.expand * d
    h, p, n, g, q = di // cfg.headdim, cfg.headdim, cfg.d_state, cfg.ngroups, cfg.chunk_size
    conv = di + 2 * g * n
    zxbcdt = 2 * di + 2 * g * n + h
    if ssm_kernels:
        # mamba_ssm: conv and scan kernels keep views of in_proj's output and the conv output, the
        # scan its output and fp32 dA_cumsum, the gated norm its rstd; nothing per chunk.
        mamba = a * (d + zxbcdt + conv + 2 * di) + FP32 * (h + g)
    else:
        # Our chunked SSD (model/mamba.py): conv input, output and silu(output); per chunk the C.B^T,
        # decay and score matrices (q per token), the carried state (h p n per chunk, fp32) and its
        # bf16 copy; seven d_inner-wide tensors around the scan and gate, two fp32 in the gated norm.
        mamba = (a * (d + 3 * conv + zxbcdt + 7 * di + 4 * g * n + (2 * h + g) * q + h * p * n / q)
                 + FP32 * (2 * di + h * p * n / q + g + 6 * h))

    hidden = cfg.mlp_ratio * d if cfg.mlp_hidden is None else cfg.mlp_hidden
    mlp = (linear_inputs(d, 1) + 2 * a * hidden if cfg.mlp == "relu2"   # relu output, its square
           else linear_inputs(d, 2) + 4 * a * hidden)                    # gate, silu(gate), up, product

    pattern = expand_pattern(cfg.block_pattern, cfg.n_layer)
    has_mlp = {kind: cfg.mlp_ratio > 0 and (kind != "M" or cfg.mamba_mlp) for kind in "AM"}
    per_block = {kind: mixer + norm + (mlp + norm if has_mlp[kind] else 0)
                 for kind, mixer in (("A", attention), ("M", mamba))}
    out = {}
    for kind, name in (("A", "attention blocks"), ("M", "mamba blocks")):
        count = pattern.count(kind)
        if count:
            out[name] = count * (FP32 * d if checkpointing else per_block[kind])
    if checkpointing:
        out["recompute"] = max(per_block[kind] for kind in set(pattern))
    # Embedding norm, final norm, the head's input, targets; cross-entropy keeps fp32 log-softmax and
    # its backward briefly holds two more vocab-wide fp32 tensors (the peak, at the start of backward).
    out["embedding + head"] = (norm if cfg.embed_norm else 0) + norm + linear_inputs(d, 1) + 8 + 3 * FP32 * V
    if cfg.pointer:  # its q, k, gate inputs and outputs; per token a row of fp32 scores and weights over
        # the whole sequence and the row's token-equality mask (model/pointer.py: nll)
        out["pointer"] = linear_inputs(d, 3) + FP32 * (2 * hd + 1) + (2 * FP32 + 1) * cfg.sequence_len
    return out


def peak_per_token(parts: dict[str, float]) -> float:
    """The activation peak from activation_bytes_per_token's parts: the head's backward is over
    before the first block is recomputed, so with checkpointing only the larger of the two counts."""
    return sum(parts.values()) - min(parts.get("recompute", 0), parts["embedding + head"])


def fsdp_gathered(sizes: Sizes, n: int) -> tuple[float, float]:
    """Parameters and gradients FSDP2 holds beyond each rank's shard at their peaks, over n ranks
    (fully_shard as hybridchat/infra/parallel.py lays it out; torch 2.13's FSDPParamGroup, measured
    in tests/test_plan.py).

    Parameters: the root (embedding, head) stays gathered from forward to backward. In forward a
    module's all-gather buffer outlives its copy-out into the parameters until the next module's
    copy-out is done, so at a block's copy-out the previous module's buffer (the root's before the
    first block), the block's buffer and its parameters are live: the root + max(root, block) + 2
    blocks. Backward holds less: the current block and the one prefetched.

    Gradients: each unit's whole gradient is copied into its reduce-scatter buffer before it is freed
    (2 whole copies), while the shards of the units reduced before it are kept: at the root's reduce
    (the last) every block's shard and 2 roots; at a block's, the head's gradient (computed first,
    reduced with the root's at the end; the root counted), 2 blocks and at most the other blocks' shards."""
    block, root = sizes.largest_block, sizes.root
    weights = root + max(root, block) + 2 * block
    grads = max(2 * root - root / n, root - root / n + 2 * block - block / n)
    return weights, grads


def fsdp_accumulated_grads(sizes: Sizes, n: int) -> float:
    """Gradients FSDP2 holds per rank when a step accumulates micro-batches: between them every
    unit's gradient stays whole (set_requires_gradient_sync(False) skips the reduce-scatter), so the
    last micro-batch's backward starts from the whole model's; the first unit it reduces adds its
    reduce-scatter copy (the largest block's, as a bound), the root, reduced last, 2 roots beside the
    blocks' shards (tests/test_plan_fsdp.py measures it)."""
    block, root = sizes.largest_block, sizes.root
    return max(sizes.total + block, (sizes.total - root) / n + 2 * root)


def training_memory(sizes: Sizes, cfg: ModelConfig, vocab_size: int, setup: Setup, autocast: bool,
                    ssm_kernels: bool, muon: bool = True, accumulating: bool = False) -> Memory:
    """accumulating: more than one micro-batch per optimizer step (only FSDP holds more for it)."""
    n = setup.n_gpus
    fsdp = setup.strategy == "fsdp" and n > 1
    shard = n if fsdp else 1
    weights = FP32 * sizes.total / shard
    grads = FP32 * sizes.total / shard
    if fsdp:
        gathered_weights, gathered_grads = fsdp_gathered(sizes, n)
        weights += FP32 * gathered_weights
        grads = FP32 * (fsdp_accumulated_grads(sizes, n) if accumulating else sizes.total / n + gathered_grads)
    elif n > 1:
        grads += FP32 * sizes.total  # DDP's gradient buckets: a second copy of every gradient
    adam = sizes.total - sizes.matrix if muon else sizes.total  # stage.matrix_optimizer=adamw: AdamW on all
    optimizer = FP32 * ((sizes.matrix if muon else 0) + 2 * adam) / shard
    per_token = peak_per_token(activation_bytes_per_token(cfg, vocab_size, autocast, ssm_kernels,
                                                          setup.activation_checkpointing))
    activations = per_token * setup.micro_batch * cfg.sequence_len
    if autocast:
        # bf16 copies of the matmul weights, cached by autocast and saved for backward. Whole on every
        # rank under FSDP too: autocast casts the gathered fp32 weights (parallel.prepare sets no
        # MixedPrecisionPolicy), and resharding frees the fp32 weights, not their saved copies.
        activations += 2 * sizes.matmul
    return Memory(weights=int(weights), grads=int(grads), optimizer=int(optimizer), activations=int(activations))


@dataclass(frozen=True)
class Planner:
    """Everything a plan depends on, resolved once from the config."""
    cfg: ModelConfig
    stage: StageConfig
    vocab_size: int
    autocast: bool
    ssm_kernels: bool
    capacity: int
    sizes: Sizes

    def grad_accum(self, setup: Setup) -> int | None:
        """Micro-batches per step at this setup; None when stage.total_batch_tokens does not divide."""
        try:
            return grad_accum_steps(self.stage.total_batch_tokens, setup.micro_batch, self.cfg.sequence_len,
                                    setup.n_gpus)
        except UserError:
            return None

    def memory(self, setup: Setup) -> Memory:
        accum = self.grad_accum(setup)
        return training_memory(self.sizes, self.cfg, self.vocab_size, setup, self.autocast, self.ssm_kernels,
                               muon=self.stage.matrix_optimizer == "muon", accumulating=accum is None or accum > 1)

    def fits(self, setup: Setup) -> bool:
        return self.memory(setup).total <= self.capacity

    def allowed_micro_batches(self, n_gpus: int) -> list[int]:
        """Candidates in increasing order: the divisors of the per-rank sequences per step when
        stage.total_batch_tokens is set (runtime.grad_accum_steps' rule), else powers of two."""
        T = self.cfg.sequence_len
        total = self.stage.total_batch_tokens
        if total is None:
            return [2**k for k in range(20)]
        grad_accum_steps(total, 1, T, n_gpus)  # the loop's own error when not even 1 divides
        rows = total // (T * n_gpus)
        return [m for m in range(1, rows + 1) if rows % m == 0]

    def max_micro_batch(self, setup: Setup) -> int:
        """The largest allowed micro-batch that fits, or 0. Every candidate is tried: activations grow
        with the micro-batch, but under FSDP a smaller one may accumulate and hold whole gradients."""
        return max((m for m in self.allowed_micro_batches(setup.n_gpus) if self.fits(replace(setup, micro_batch=m))),
                   default=0)

    def row(self, setup: Setup, peak_tflops: float, mfu: float) -> Row:
        accum = self.grad_accum(setup)
        flops = flops_per_token(self.cfg, self.vocab_size) * (RECOMPUTE_FACTOR if setup.activation_checkpointing
                                                               else 1)
        speed = mfu * peak_tflops * 1e12 * setup.n_gpus / flops if peak_tflops else None
        return Row(setup=setup, memory=self.memory(setup), fits=self.fits(setup),
                   max_micro_batch=self.max_micro_batch(setup), grad_accum=accum, tokens_per_s=speed)


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    with torch.device("meta"):
        return HybridLM(cfg, vocab_size).flops_per_token()


def vocab_size_of(model: ModelConfig, data: DataConfig) -> int:
    """What training uses: model.vocab_size, else the tokenizer's size (data.tokenizer_vocab_size)."""
    return model.vocab_size or data.tokenizer_vocab_size


def uses_ssm_kernels(gpu: GPUConfig, check_import: bool) -> bool:
    """Whether Mamba layers run mamba_ssm's kernels. For `auto` on CUDA the planner app assumes the
    GPU extra is installed (check_import=False); training checks that it imports."""
    backend = gpu.ssm_backend.value
    if backend == "cuda":
        return True
    if backend == "auto" and gpu.device.value == "cuda":
        if not check_import:
            return True
        from hybridchat.model.mamba import cuda_kernels_available

        return cuda_kernels_available()
    return False


def make_planner(config: Config, capacity: int, ssm_kernels: bool) -> Planner:
    vocab = vocab_size_of(config.model, config.data)
    return Planner(cfg=config.model, stage=config.stage, vocab_size=vocab,
                   autocast=config.gpu.dtype.value != "float32", ssm_kernels=ssm_kernels, capacity=capacity,
                   sizes=model_sizes(config.model, vocab))


def gpu_capacity(gpu: GPUConfig) -> int:
    """gpu.memory_gb (GiB, as GPU memory is sold), or this machine's physical memory for the CPU
    preset (memory_gb 0), shared by the processes torchrun starts on it."""
    if gpu.memory_gb > 0:
        return int(gpu.memory_gb * GiB)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return physical // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def device_memory(gpu: GPUConfig, device: torch.device) -> int:
    """What training plans against: the CUDA device's own memory when on one, else gpu_capacity."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return gpu_capacity(gpu)


def check_micro_batch(value) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise UserError(f"gpu.micro_batch={value!r} is not allowed: give a positive integer or auto "
                        f"(the largest that fits the device's memory, by python -m hybridchat.plan)")


def resolve_micro_batch(config: Config, world_size: int, device_memory_bytes: int,
                        ssm_kernels: bool | None = None) -> int:
    """gpu.micro_batch as training uses it: the int given, or for `auto` the largest allowed one that
    fits device_memory_bytes under the configured strategy and checkpointing; a UserError saying what
    would fit when none does."""
    value = config.gpu.micro_batch
    check_micro_batch(value)
    if value != "auto":
        return value
    if ssm_kernels is None:
        ssm_kernels = uses_ssm_kernels(config.gpu, check_import=True)
    planner = make_planner(config, device_memory_bytes, ssm_kernels)
    setup = Setup(world_size, config.distributed.strategy.value, 1, config.gpu.activation_checkpointing)
    best = planner.max_micro_batch(setup)
    if not best:
        raise UserError(f"gpu.micro_batch=auto: {not_fit_reason(planner, setup)}; "
                        + "; ".join(advice(planner, setup)))
    return best


def not_fit_reason(planner: Planner, setup: Setup) -> str:
    m = planner.memory(setup)
    return (f"micro_batch={setup.micro_batch} with {setup.describe()} needs {m.total / GiB:.1f} GiB per GPU "
            f"(weights {m.weights / GiB:.1f}, gradients {m.grads / GiB:.1f}, optimizer {m.optimizer / GiB:.1f}, "
            f"activations {m.activations / GiB:.1f}, overhead {m.overhead / GiB:.1f}) but the device has "
            f"{planner.capacity / GiB:.1f} GiB")


def advice(planner: Planner, setup: Setup) -> list[str]:
    """What would fit instead, cheapest change first: a smaller micro-batch, activation
    checkpointing, FSDP over the same GPUs (or more), both; else how small a model would fit."""
    tries = [("gpu.micro_batch", setup),
             ("gpu.activation_checkpointing=true", replace(setup, activation_checkpointing=True))]
    n_options = sorted({setup.n_gpus, max(setup.n_gpus, 2), 8})
    for n in n_options:
        if n > 1:
            tries.append((f"distributed.strategy=fsdp over {n} GPUs", replace(setup, strategy="fsdp", n_gpus=n)))
            tries.append((f"distributed.strategy=fsdp over {n} GPUs + gpu.activation_checkpointing=true",
                          replace(setup, strategy="fsdp", n_gpus=n, activation_checkpointing=True)))
    out, same_gpus_fit = [], False
    for what, option in tries:
        best = planner.max_micro_batch(option)
        if best and (what != "gpu.micro_batch" or best < setup.micro_batch):
            label = f"gpu.micro_batch={best}" if what == "gpu.micro_batch" else f"{what} (micro_batch {best})"
            out.append(f"fits: {label}")
            same_gpus_fit |= option.n_gpus == setup.n_gpus
    if not same_gpus_fit:
        # Bytes per parameter that do not depend on the batch: weights, grads, optimizer (<= 16).
        static = planner.memory(replace(setup, micro_batch=1, activation_checkpointing=True))
        per_param = (static.weights + static.grads + static.optimizer) / planner.sizes.total
        room = (planner.capacity - OVERHEAD_FIXED) / (1 + OVERHEAD_FRACTION) - (static.activations)
        out.append(f"nothing fits on {setup.n_gpus} GPU(s): use a smaller model (weights, gradients and optimizer take "
                   f"{per_param:.0f} bytes per parameter here, so at most ~{max(0, room / per_param) / 1e6:.0f}M "
                   f"parameters) or a device with more memory")
    return out


def plan(config: Config, n_gpus: list[int], mfu: float, capacity: int | None = None,
         ssm_kernels: bool | None = None) -> Plan:
    """The plan for the configured run on 1..N GPUs (DDP and FSDP rows for N > 1). An `auto`
    micro-batch is shown at the largest that fits each way."""
    check_micro_batch(config.gpu.micro_batch)
    capacity = gpu_capacity(config.gpu) if capacity is None else capacity
    kernels = uses_ssm_kernels(config.gpu, check_import=False) if ssm_kernels is None else ssm_kernels
    planner = make_planner(config, capacity, kernels)
    ckpt = config.gpu.activation_checkpointing
    result = Plan(model=config.model.name, gpu=config.gpu.name, vocab_size=planner.vocab_size,
                  sequence_len=config.model.sequence_len, dtype=config.gpu.dtype.value, ssm_kernels=kernels,
                  capacity_bytes=capacity, mfu=mfu, params=planner.sizes.params,
                  activation_bytes_per_token=activation_bytes_per_token(
                      config.model, planner.vocab_size, planner.autocast, kernels, ckpt))
    setups = [Setup(n, s, 1, ckpt) for n in n_gpus for s in (["ddp"] if n == 1 else ["ddp", "fsdp"])]
    for setup in setups:
        micro = config.gpu.micro_batch
        if micro == "auto":
            micro = planner.max_micro_batch(setup) or 1
        result.rows.append(planner.row(replace(setup, micro_batch=micro), config.gpu.peak_tflops_bf16, mfu))
    configured = [r for r in result.rows if r.setup.strategy == config.distributed.strategy.value
                  or r.setup.n_gpus == 1]
    if not any(r.fits for r in configured):
        first = configured[0].setup
        result.advice = [not_fit_reason(planner, first)] + advice(planner, first)
    return result
