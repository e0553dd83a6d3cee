"""The memory planner as a command: what a training run needs per GPU.

    python -m hybridchat.plan model=hybrid_d20 gpu=rtx3070
    python -m hybridchat.plan -m model=hybrid_d20 'gpu=glob(*,exclude=cpu)'

A Hydra app composing the same groups as training (conf/plan.yaml), so it plans exactly the run the
same overrides would train (hybridchat.infra.planner). It prints one table per preset and writes
plan.json to the run dir.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hybridchat.core.errors import UserError, run_hydra_app, run_or_exit
from hybridchat.core.fsutil import atomic_write_json
from hybridchat.data.sources import DataConfig
from hybridchat.infra import config as config_schema
from hybridchat.infra.config import DistributedConfig, GPUConfig, PathsConfig, StageConfig
from hybridchat.infra.planner import OVERHEAD_FIXED, OVERHEAD_FRACTION, RECOMPUTE_FACTOR, GiB, Plan, plan
from hybridchat.model.config import ModelConfig
from hybridchat.training.stages import stage_schemas


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def render(p: Plan) -> str:
    lines = [f"model={p.model} gpu={p.gpu}: {p.capacity_bytes / GiB:.1f} GiB per device, {p.dtype}, "
             f"sequence_len {p.sequence_len}, vocab {p.vocab_size}, Mamba scan: "
             f"{'mamba_ssm kernels' if p.ssm_kernels else 'PyTorch chunked SSD'}"]
    total = sum(p.params.values())
    lines.append("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in p.params.items())
                 + f"; total {total / 1e6:.1f}M")
    lines.append("activations per sequence: " + ", ".join(
        f"{k} {v * p.sequence_len / 2**20:.0f} MiB" for k, v in p.activation_bytes_per_token.items()))
    header = ("setup", "micro", "weights", "grads", "optim", "activ", "overhd", "total GiB", "fits", "max micro",
              "accum", "tok/s")
    table = [header]
    for r in p.rows:
        m = r.memory
        table.append((r.setup.describe(), str(r.setup.micro_batch), _gib(m.weights), _gib(m.grads),
                      _gib(m.optimizer), _gib(m.activations), _gib(m.overhead), _gib(m.total),
                      "yes" if r.fits else "NO", str(r.max_micro_batch or "none"),
                      "-" if r.grad_accum is None else str(r.grad_accum),
                      "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in table]
    if p.advice:
        lines.append("does not fit: " + p.advice[0])
        lines += [f"  {a}" for a in p.advice[1:]]
    lines.append(f"assumed: MFU {p.mfu:.0%} of the preset's peak bf16 TFLOP/s (x{RECOMPUTE_FACTOR:.2f} work with "
                 f"activation checkpointing); overhead {OVERHEAD_FIXED / GiB:.0f} GiB + {OVERHEAD_FRACTION:.0%} of "
                 f"tensors; eager PyTorch (torch.compile usually saves less)")
    return "\n".join(lines)


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    gpu: GPUConfig = field(default_factory=GPUConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    data: DataConfig = field(default_factory=DataConfig)   # the tokenizer's vocabulary size
    paths: PathsConfig = field(default_factory=PathsConfig)
    n_gpus: list[int] = field(default_factory=lambda: [1, 8])   # one row per count; DDP and FSDP rows for counts > 1
    mfu: float = 0.4     # assumed model FLOPs utilisation for tokens/s (stated in the output)


def register() -> None:
    config_schema.register(stage_schemas())
    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def run(cfg: DictConfig) -> Plan:
    config: PlanConfig = OmegaConf.to_object(cfg)
    if not config.n_gpus or min(config.n_gpus) < 1:
        raise UserError(f"n_gpus={config.n_gpus} must list GPU counts >= 1, e.g. [1, 8]")
    if not 0 < config.mfu <= 1:
        raise UserError(f"mfu={config.mfu} must be in (0, 1], e.g. 0.4")
    result = plan(config, sorted(set(config.n_gpus)), config.mfu)
    out = Path(HydraConfig.get().runtime.output_dir)
    atomic_write_json(out / "plan.json", asdict(result))
    print(render(result) + f"\nplan: {out / 'plan.json'}")
    return result


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    run_hydra_app(main)
