"""Checkpoints: safetensors weights + optimizer state, JSON metadata, atomic, never pickled.

Layout: <paths.checkpoints>/<run_name>/<stage>/step_000600/ holding model.safetensors,
optimizer.safetensors, tokenizer.json and meta.json (with the run's resolved config). A step folder
is self-contained: hybridchat.training.runs.load_run rebuilds the run (model, tokenizer, typed config)
from it alone. It is built under a temp name and renamed into place whole, and meta.json is the last
file written (with a sha256 of each other file, checked on load), so a directory without it never
counts as a checkpoint and damaged bytes are refused. The files hold full tensors whatever the run's layout: an FSDP run
gathers its shards to save and cuts them again on load, so one folder moves between one process,
DDP and FSDP.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hybridchat.core.errors import UserError
from hybridchat.core.fsutil import (
    atomic_directory,
    atomic_write_text,
    current_umask,
    remove_stale_temporaries,
    sha256_file,
)
from hybridchat.infra import parallel

FORMAT_VERSION = 1
CHECKSUMMED = ("model.safetensors", "optimizer.safetensors", "tokenizer.json")


def stage_dir(checkpoints: str | Path, run_name: str, stage: str) -> Path:
    return Path(checkpoints) / run_name / stage


def _optimizer_payload(optimizers: list[torch.optim.Optimizer], keep: bool) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, described = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, state in sd["state"].items():
            for name, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{i}.{pid}.{name}"] = value
                else:
                    scalars.setdefault(str(pid), {})[name] = value
        described.append({"type": type(opt).__name__, "param_groups": sd["param_groups"], "scalars": scalars})
    return parallel.full_tensors(tensors, keep), described


def _restore_optimizers(optimizers, tensors: dict[str, torch.Tensor], described: list[dict]) -> None:
    if len(described) != len(optimizers) or any(d["type"] != type(o).__name__ for d, o in zip(described, optimizers)):
        raise UserError(f"checkpoint optimizers {[d['type'] for d in described]} do not match this run's "
                        f"{[type(o).__name__ for o in optimizers]}")
    for i, (opt, desc) in enumerate(zip(optimizers, described)):
        # State ids number the parameters through the groups in order (torch.optim's state_dict).
        params = [p for group in opt.param_groups for p in group["params"]]
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            opt_index, pid, name = key.split(".", 2)
            if int(opt_index) == i:
                param = params[int(pid)]
                # Per-parameter moments are sharded like their parameter; a step count is not.
                state.setdefault(int(pid), {})[name] = (parallel.shard_like(value, param)
                                                        if value.shape == param.shape else value)
        for pid, scalars in desc["scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        # JSON turned tuples (betas, ns_coefficients) into lists; give the optimizers tuples back.
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in desc["param_groups"]]
        opt.load_state_dict({"state": state, "param_groups": groups})


def earlier_run(directory: Path, resume: bool, overwrite: bool) -> list[Path]:
    """The checkpoints an earlier run left in this stage folder, which a new run (not resuming) replaces.

    Pruning keeps the highest steps, so an earlier run's step 200 would outlive a new run's step 6 and
    the next stage would start from the old weights: a new run into an occupied folder is refused
    unless the user says overwrite=true (and then the old steps go when the new run's first one is
    saved, so a run that fails before that loses nothing)."""
    found = [] if resume else list_checkpoints(directory)
    if found and not overwrite:
        raise UserError(f"{directory} already holds checkpoints of an earlier run ({', '.join(p.name for p in found)}); "
                        f"continue it with resume=true, train under another run_name=..., or replace them with "
                        f"overwrite=true")
    return found


def save(directory: Path, step: int, model, optimizers, meta: dict[str, Any], keep: int, tokenizer,
         write: bool = True, protect: Collection[int] = (), replaces: Collection[Path] = ()) -> Path | None:
    """Write step `step`'s folder, remove the folders in `replaces` (an earlier run's, see
    earlier_run), then all but the last `keep` (the steps in `protect` stay). Under FSDP every rank
    must call this (the full tensors are gathered from the shards); only the one with write=True
    writes, and the others get None. The files are the same as a one-process run's."""
    target = Path(directory) / f"step_{step:06d}"
    tensors, described = _optimizer_payload(optimizers, write)
    weights = parallel.full_tensors(model.state_dict(), write)
    if not write:
        return None
    remove_stale_temporaries(directory)  # a save killed half-way (kill -9) left its temp folder here
    full_meta = {"format_version": FORMAT_VERSION, "step": step, "architecture": model.architecture(),
                 "optimizers": described, **meta}
    with atomic_directory(target) as tmp:
        for name, payload in (("model.safetensors", weights), ("optimizer.safetensors", tensors)):
            save_file(payload, str(tmp / name))
            # safetensors creates its files 0600; give the mode any other file gets (meta.json's)
            os.chmod(tmp / name, 0o666 & ~current_umask())
        tokenizer.save(tmp / "tokenizer.json")
        # A checksum per file: bytes damaged on disk (same size, still parseable) would load as a model
        # that answers garbage with full confidence; load() refuses them instead.
        full_meta["sha256"] = {name: sha256_file(tmp / name) for name in CHECKSUMMED}
        (tmp / "meta.json").write_text(_meta_text(full_meta))
    for old in replaces:
        if Path(old) != target:  # a same-numbered step was replaced whole by the rename above
            shutil.rmtree(old, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        if int(old.name.removeprefix("step_")) not in protect:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _meta_text(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2, default=str) + "\n"


def update_meta(path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Set `fields` in step folder `path`'s meta.json (atomically: a reader sees the old or the new
    file whole), keeping everything else, the checksums of the weight files included: what is
    learned about a checkpoint after its save (its abstention threshold) lives with it."""
    meta = {**read_meta(path), **fields}
    atomic_write_text(Path(path) / "meta.json", _meta_text(meta))
    return meta


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step_*") if (p / "meta.json").is_file())


def latest(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, huge integers
        raise UserError(f"checkpoint metadata {file} is unreadable or corrupted ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None
    version = meta.get("format_version", 0) if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"checkpoint metadata {file} is not a hybridchat checkpoint's (expected a JSON object with "
                        f"an integer format_version)")
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format_version {meta['format_version']}; this hybridchat reads "
                        f"up to {FORMAT_VERSION}: upgrade hybridchat")
    return meta


def verify(file: Path, meta: dict[str, Any]) -> None:
    """Refuse a file whose bytes differ from the checksum meta.json recorded at save (checkpoints saved
    before checksums have none)."""
    expected = meta.get("sha256", {}).get(file.name)
    if expected is None:
        return
    try:
        actual = sha256_file(file)
    except OSError as e:
        raise UserError(f"checkpoint file {file} cannot be read ({e.strerror})") from None
    if actual != expected:
        raise UserError(f"checkpoint file {file} is corrupted: its sha256 differs from the one meta.json recorded "
                        f"when it was saved")


def _load_tensors(file: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    verify(file, meta)
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or foreign files
        raise UserError(f"checkpoint file {file} is truncated or corrupted ({e})") from e


def load(path: Path, model, optimizers=None, tokenizer_fingerprint: str | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) into `model`, refusing a checkpoint of another architecture."""
    path = Path(path)
    meta = read_meta(path)
    # Checkpoints written before these options existed were all built this way.
    before_options = {"mlp": "relu2", "mlp_hidden": None, "qk_norm": True, "norm_weights": False, "norm_eps": None,
                      "embed_norm": True, "tie_embeddings": False, "pointer": False,
                      "request_match": False, "qkv_bias": False}
    saved, current = {**before_options, **meta.get("architecture", {})}, model.architecture()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise UserError(f"checkpoint {path} does not fit this model ({'; '.join(diffs)}); choose the matching "
                        f"model/block_pattern or another run_name")
    if tokenizer_fingerprint and meta.get("tokenizer") not in (None, tokenizer_fingerprint):
        raise UserError(f"checkpoint {path} was trained with tokenizer {meta['tokenizer']}, this run built "
                        f"{tokenizer_fingerprint}: the data/tokenizer settings differ from the checkpoint's")
    verify(path / "tokenizer.json", meta)
    weights = _load_tensors(path / "model.safetensors", meta)
    current = model.state_dict()  # under FSDP: this rank's shards, to cut the full tensors like them
    weights = {k: parallel.shard_like(v, current[k]) if k in current else v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path}/model.safetensors does not match the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    if optimizers is not None:
        _restore_optimizers(optimizers, _load_tensors(path / "optimizer.safetensors", meta), meta["optimizers"])
    return meta


def find(checkpoints: str | Path, run_name: str, stage: str, step: int | None = None) -> Path:
    """The step folder of run_name/stage (the latest without step), or one line saying what to run."""
    directory = stage_dir(checkpoints, run_name, stage)
    if step is not None:
        path = directory / f"step_{step:06d}"
        if not (path / "meta.json").is_file():
            have = [p.name for p in list_checkpoints(directory)]
            raise UserError(f"no checkpoint {path}; {directory} holds {have or 'none'}")
        return path
    found = latest(directory)
    if found is None:
        raise UserError(f"{directory} holds no checkpoint: train it first with "
                        f"python -m hybridchat.train stage={stage} run_name={run_name} (and the same model=...)")
    return found


def at_path(path: str | Path) -> Path:
    """A checkpoint named by its folder: a step folder, or a stage folder (its latest step)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    found = latest(path)
    if found is None:
        raise UserError(f"{path} is neither a checkpoint step folder (with meta.json) nor a folder of them")
    return found


def source(checkpoints: str | Path, run_name: str, name: str, required: bool = True) -> Path | None:
    """stage.source's checkpoint: a path (it holds a /) names a folder of any run; otherwise the
    latest of run_name's stage `name` (none there: one line saying what to run, or None where not
    required)."""
    if "/" in name:
        return at_path(name)
    return find(checkpoints, run_name, name) if required else latest(stage_dir(checkpoints, run_name, name))
