"""The one entrypoint: python -m hybridchat.train [group=option ...] [key=value ...]

config -> runtime -> data + tokenizer -> model -> stage -> loop -> checkpoint + metrics.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch.distributed as dist
from hydra.conf import RunMode
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hybridchat import config as config_schema
from hybridchat import loop, runtime
from hybridchat.config import Config
from hybridchat.data.sources import build_source
from hybridchat.data.tokenizer import Tokenizer, load_or_train
from hybridchat.engine import Engine
from hybridchat.errors import UserError
from hybridchat.model.blocks import expand_pattern
from hybridchat.model.lm import HybridLM, check_sizes
from hybridchat.stages import build_stage
from hybridchat.tracking import Tracker

log = logging.getLogger("hybridchat")
config_schema.register()


def typed_config(cfg: DictConfig) -> tuple[Config, dict[str, Any]]:
    """The composed config as dataclasses (validated) and as a plain resolved dict (for metadata)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required value(s): {', '.join(missing)}; set them on the command line, "
                        f"e.g. {missing[0]}=...")
    return OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def build_tokenizer(config: Config, source, rt: runtime.Runtime) -> Tokenizer:
    # Rank 0 trains (or finds) the cached tokenizer first; the other ranks then read the same file.
    def get() -> Tokenizer:
        return load_or_train(source("train", 0), config.data.tokenizer_vocab_size, config.data.tokenizer_train_chars,
                             config.paths.cache)

    tok = get() if rt.is_main else None
    if rt.distributed:
        dist.barrier()
    return tok or get()


def samples(model: HybridLM, tokenizer: Tokenizer, prompts: tuple[str, ...], max_new_tokens: int = 32):
    """Greedy completions of the stage's sample prompts, up to the next document boundary."""
    if not prompts:
        return []
    model.eval()
    result = Engine(model).generate([[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts],
                                    max_new_tokens=max_new_tokens, temperature=0, stop_tokens=[tokenizer.bos_id])
    return [(p, tokenizer.decode(tokens).strip()) for p, tokens in zip(prompts, result.tokens)]


def run(cfg: DictConfig) -> float:
    config, resolved = typed_config(cfg)
    # Fail on sizes, pattern and batch arithmetic in the first second, not after building data.
    check_sizes(config.model)
    expand_pattern(config.model.block_pattern, config.model.n_layer)
    rt = runtime.setup(config.gpu, config.seed)
    try:
        loop.grad_accum_steps(config.stage.total_batch_tokens, config.gpu.micro_batch, config.model.sequence_len,
                              rt.world_size)
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        source = build_source(config.data, config.paths)
        tokenizer = build_tokenizer(config, source, rt)
        vocab_size = config.model.vocab_size or tokenizer.vocab_size
        if vocab_size < tokenizer.vocab_size:
            raise UserError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
        model = HybridLM(config.model, vocab_size, ssm_backend=config.gpu.ssm_backend.value)
        model.init_weights()
        model.to(rt.device)
        if rt.is_main:
            log.info("model %s: %.2fM parameters, block pattern %s, vocab %d, device %s, world size %d",
                     config.model.name, model.num_params() / 1e6, model.pattern, vocab_size, rt.device, rt.world_size)
        stage = build_stage(config.stage.name, cfg=config, tokenizer=tokenizer, source=source)
        if config.retriever.kind != "none" and not stage.reads_documents and rt.is_main:
            log.warning("retriever=%s is not used: stage=%s reads no documents (build and search knowledge "
                        "bases with python -m hybridchat.kb)", config.retriever.kind, stage.name)
        group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
        tracker = Tracker(run_dir if rt.is_main else None, config.logger, resolved, group=group,
                          job_type=stage.name, name=config.run_name)
        try:
            summary = loop.train(model, stage, config, rt, tracker, tokenizer, resolved)
        except BaseException:  # the next sweep job must not inherit an open wandb run
            tracker.finish(exit_code=1)
            raise
        tracker.finish()
        if rt.is_main:
            for prompt, completion in samples(model, tokenizer, stage.sample_prompts):
                print(f"sample: {prompt} >>> {completion}")
            print(f"val bpb {summary['first_val_bpb']:.4f} -> {summary['final_val_bpb']:.4f}\n"
                  f"checkpoint: {summary['checkpoint']}\n"
                  f"metrics:    {tracker.metrics_path}\n"
                  f"plot:       {tracker.plot_path}")
        if rt.distributed:  # leave together: a rank tearing down while another still talks can abort
            dist.barrier()
        return summary["final_val_bpb"]
    finally:
        runtime.teardown()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
