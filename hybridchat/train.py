"""The one entrypoint: python -m hybridchat.train [group=option ...] [key=value ...]

config -> runtime -> run context (tokenizer, world, data, knowledge base: built on first use) -> model
-> stage -> loop -> checkpoint + metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import torch.distributed as dist
from hydra.conf import RunMode
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hybridchat.core.errors import UserError, run_hydra_app, run_or_exit
from hybridchat.infra import checkpoint, parallel, planner, runtime
from hybridchat.infra import config as config_schema
from hybridchat.infra.build import build_model
from hybridchat.infra.config import Config
from hybridchat.infra.context import RunContext, source_model
from hybridchat.infra.preemption import Preempted, requeue_after_warning
from hybridchat.infra.tracking import Tracker, run_tags
from hybridchat.model.blocks import expand_pattern
from hybridchat.model.lm import check_sizes
from hybridchat.training import loop
from hybridchat.training.stages import build_stage, stage_schemas

log = logging.getLogger("hybridchat")
config_schema.register(stage_schemas())
CONF = Path(__file__).resolve().parent.parent / "conf"
# The model a run gets when neither the command line nor an experiment chooses one.
DEFAULT_MODEL = next(d["model"] for d in OmegaConf.load(CONF / "config.yaml").defaults
                     if isinstance(d, DictConfig) and "model" in d)


def typed_config(cfg: DictConfig) -> tuple[Config, dict[str, Any]]:
    """The composed config as dataclasses (validated) and as a plain resolved dict (for metadata)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required value(s): {', '.join(missing)}; set them on the command line, "
                        f"e.g. {missing[0]}=...")
    config = OmegaConf.to_object(cfg)
    config.stage.check()
    return config, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def model_choice(hc) -> tuple[bool, set[str]]:
    """(whether this run chose its model: model= on the command line or an experiment's, the model.*
    keys the command line set): what training from another run's checkpoint may take from it."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task]
    chosen = "model" in keys or hc.runtime.choices.get("model") != DEFAULT_MODEL
    return chosen, {k.removeprefix("model.").split(".")[0] if k.startswith("model.") else "block_pattern"
                    for k in keys if k.startswith("model.") or k == "model/block_pattern"}


def adopt_source_model(config: Config, resolved: dict[str, Any], hc) -> bool:
    """A run that chose no model trains the model of its stage.source checkpoint where the default
    would not load it (an imported one: run_name=NAME stage.source=pretrained is enough)."""
    chosen, set_keys = model_choice(hc)
    model = None if chosen else source_model(config, set_keys)
    if model is not None:
        config.model, resolved["model"] = model, dataclasses.asdict(model)
    return model is not None


def monitor_report(monitor: str, summary: dict[str, Any]) -> str:
    """The monitored metric from this run's first evaluation to its last. A resumed run may have
    evaluated only at its end: one value, said as such (it printed "val/bpb 3.2737 -> 3.2737")."""
    if "first" in summary:
        return f"{monitor} {summary['first']:.4f} -> {summary['final']:.4f}"
    return (f"{monitor} {summary['final']:.4f} (resumed at step {summary['start_step']}: no evaluation before the "
            f"last to compare with)")


def run(cfg: DictConfig) -> float:
    config, resolved = typed_config(cfg)
    hc = HydraConfig.get()
    adopted = adopt_source_model(config, resolved, hc)
    # Fail on sizes, pattern and batch arithmetic in the first second, not after building data.
    check_sizes(config.model)
    expand_pattern(config.model.block_pattern, config.model.n_layer)
    checkpoint.earlier_run(checkpoint.stage_dir(config.paths.checkpoints, config.run_name, config.stage.name),
                           config.resume, config.overwrite)
    rt = runtime.setup(config.gpu, config.seed)
    try:
        # An int is checked, `auto` becomes the largest micro-batch that fits (hybridchat.infra.planner), once,
        # before anything reads it; checkpoints record the value used.
        config.gpu.micro_batch = resolved["gpu"]["micro_batch"] = planner.resolve_micro_batch(
            config, rt.world_size, planner.device_memory(config.gpu, rt.device))
        if rt.is_main:
            log.info("gpu.micro_batch=%d (%s)", config.gpu.micro_batch, cfg.gpu.micro_batch)
        ctx = RunContext(config, rt)
        ctx.grad_accum  # noqa: B018 (checked now, before data and model are built)
        run_dir = Path(hc.runtime.output_dir)
        tokenizer = ctx.tokenizer
        vocab_size = config.model.vocab_size or tokenizer.vocab_size
        if vocab_size < tokenizer.vocab_size:
            raise UserError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
        model = build_model(config.model, vocab_size, tokenizer, ssm_backend=config.gpu.ssm_backend.value)
        model.init_weights()
        ctx.model = model.to(rt.device)
        if rt.is_main:
            log.info("model %s: %.2fM parameters, block pattern %s, vocab %d, device %s, world size %d",
                     config.model.name, model.num_params() / 1e6, model.pattern, vocab_size, rt.device, rt.world_size)
            if adopted:
                log.info("the model is stage.source=%s's (this run chose no model=)", config.stage.source)
        stage = build_stage(ctx)
        chose_retriever = any(o.split("=")[0].lstrip("+~") == "retriever" for o in hc.overrides.task)
        if chose_retriever and not stage.reads_documents and rt.is_main:
            log.warning("retriever=%s is not used: stage=%s reads no documents (build and search knowledge "
                        "bases with python -m hybridchat.kb)", config.retriever.kind, stage.name)
        # A sweep's folder is <date>/<time>: both name its wandb group (the time alone repeats daily).
        group = "/".join(Path(hc.sweep.dir).parts[-2:]) if hc.mode == RunMode.MULTIRUN else None
        tracker = Tracker(run_dir if rt.is_main else None, config.logger, resolved, group=group,
                          job_type=stage.name, name=config.run_name, tags=run_tags(config, stage.name))
        try:
            summary = loop.train(stage, ctx, tracker, resolved)
        except BaseException as e:  # the next sweep job must not inherit an open wandb run
            tracker.finish(exit_code=1)
            if isinstance(e, Preempted):  # checkpoint saved; main() exits with e.exit_code
                if rt.is_main:
                    requeue_after_warning(e.signum)
                # All ranks stopped at the same step. None leaves before rank 0 has finished its tracker and
                # requeued: a launcher that sees one rank exit kills the others (torchrun does).
                if rt.distributed:
                    dist.barrier()
            raise
        tracker.finish()
        with parallel.full_weights(model):  # all ranks enter (FSDP gathers); rank 0 alone generates
            samples = stage.samples(model) if rt.is_main else []
        if rt.is_main:
            for prompt, completion in samples:
                print(f"sample: {prompt} >>> {completion}")
            print(f"{monitor_report(stage.monitor, summary)}\n"
                  f"checkpoint: {summary['checkpoint']}\n"
                  f"metrics:    {tracker.metrics_path}\n"
                  f"plot:       {tracker.plot_path}")
        if rt.distributed:  # leave together: a rank tearing down while another still talks can abort
            dist.barrier()
        return summary["final"]
    finally:
        runtime.teardown()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run_or_exit(run, cfg)
    except Preempted as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one before it began: nothing new saved
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    run_hydra_app(main)
