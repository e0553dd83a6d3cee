"""Checkpoints (infra/checkpoint.py) against folders made by hand and files read directly: loading a
model and optimizer state (FSDP included), every refusal's exact message, finding steps, meta.json,
architecture checks, pruning."""

import dataclasses

import pytest
import torch
from conftest import CKPT_MODEL, TOY_MODEL, TOY_VOCAB, StubTokenizer

from hybridchat.core.errors import UserError
from hybridchat.model.lm import HybridLM
from hybridchat.training.runs import load_run

# ---- a saved step folder of a tiny model ---------------------------------------------------------

@pytest.fixture(scope="module")
def step_folder(tmp_path_factory):
    """One saved step folder of a tiny AM model (with its config and tokenizer) and an AdamW state."""
    from hybridchat.data.tokenizer import Tokenizer
    from hybridchat.infra import checkpoint

    torch.manual_seed(0)
    model = HybridLM(CKPT_MODEL, vocab_size=300)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (1, 8)), torch.randint(0, 300, (1, 8))).backward()
    opt.step()
    tokenizer = Tokenizer.train(["some text for a tokenizer"], 300)
    meta = {"config": {"model": dataclasses.asdict(CKPT_MODEL)}, "tokenizer": tokenizer.fingerprint}
    path = checkpoint.save(tmp_path_factory.mktemp("ckpt"), 7, model, [opt], meta, keep=1, tokenizer=tokenizer)
    return path


def edited_copy(src, dst, edit=None, drop=None):
    """A copy of step folder `src` at `dst` with meta.json changed by edit(meta) and file `drop` removed."""
    import json
    import shutil

    shutil.copytree(src, dst)
    if edit is not None:
        meta = json.loads((dst / "meta.json").read_text())
        edit(meta)
        (dst / "meta.json").write_text(json.dumps(meta))
    if drop is not None:
        (dst / drop).unlink()
    return dst


# ---- loading -------------------------------------------------------------------------------------

def test_load_run_refuses_an_incomplete_or_foreign_step_folder_in_one_line(step_folder, tmp_path):
    """load_run needs the model config and tokenizer.json beside the weights, a config of known
    keys, and the weights of the tokenizer saved with them; each lack is one UserError saying which
    (mutants: `meta.get("config", None)`, `or` -> `and`, messages dropped, fingerprint not checked)."""

    def no_config(meta):
        del meta["config"]

    def unknown_key(meta):
        meta["config"]["model"]["n_wings"] = 2

    def other_tokenizer(meta):
        meta["tokenizer"] = "0123456789abcdef"

    cases = [(edited_copy(step_folder, tmp_path / "a", no_config), "lacks its model config or tokenizer.json"),
             (edited_copy(step_folder, tmp_path / "b", drop="tokenizer.json"), "lacks its model config or tokenizer"),
             (edited_copy(step_folder, tmp_path / "c", unknown_key), "does not fit this hybridchat .*n_wings"),
             (edited_copy(step_folder, tmp_path / "d", other_tokenizer), "trained with tokenizer 0123456789abcdef")]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            load_run(path)
    run = load_run(step_folder)  # the untouched folder loads
    model, meta = run.model, run.meta
    assert meta["step"] == 7 and meta["format_version"] == 1 and not model.training


def test_load_run_puts_the_model_on_the_asked_device_and_ssm_backend(step_folder):
    """device and ssm_backend reach the model (mutants: model.to(None), the backend argument dropped)."""

    model = load_run(step_folder, device="meta", ssm_backend="auto").model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert [b.mixer.backend for b in model.blocks if b.kind == "M"] == ["auto"]


def test_optimizer_state_for_another_list_of_optimizers_is_refused(step_folder):
    """The step folder holds one AdamW: loading it into two AdamWs (same types where they pair up) or
    into an SGD is one UserError naming both lists (mutants: `or` -> `and`, the message dropped)."""
    from hybridchat.infra import checkpoint

    model = HybridLM(CKPT_MODEL, vocab_size=300)
    params = list(model.parameters())
    two = [torch.optim.AdamW(params[:3]), torch.optim.AdamW(params[3:])]
    with pytest.raises(UserError, match=r"checkpoint optimizers \['AdamW'\] do not match this run's "
                                        r"\['AdamW', 'AdamW'\]"):
        checkpoint.load(step_folder, model, two)
    with pytest.raises(UserError, match=r"\['AdamW'\] do not match this run's \['SGD'\]"):
        checkpoint.load(step_folder, model, [torch.optim.SGD(params, lr=0.1)])


class CountingSGD(torch.optim.SGD):
    """SGD that also keeps a plain Python number per parameter: state that is not a tensor."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["count"] = self.state[p].get("count", 0) + 1


def test_optimizer_state_round_trip_keeps_groups_as_saved_and_number_state(step_folder, tmp_path):
    """What torch.optim's own state_dict holds comes back from the folder as it was: AdamW's groups
    with betas a tuple again (JSON made it a list), and per-parameter state that is a Python number
    (mutants: lists never turned back into tuples, `params` turned instead, the number state dropped
    or filed under another parameter, or lost where a parameter has no tensor state)."""
    from hybridchat.data.tokenizer import Tokenizer
    from hybridchat.infra import checkpoint

    def groups(opt):
        return [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]

    model = load_run(step_folder).model
    params = list(model.parameters())
    as_saved = groups(torch.optim.AdamW(params, lr=1e-3))  # the fixture's optimizer, built alike
    assert type(as_saved[0]["betas"]) is tuple
    fresh = torch.optim.AdamW(params, lr=0.5, betas=(0.1, 0.2))
    checkpoint.load(step_folder, model, [fresh])
    assert groups(fresh) == as_saved

    def counting_sgd():  # momentum only in the first group: the second's state is the number alone
        return CountingSGD([{"params": params[:2], "momentum": 0.9}, {"params": params[2:]}], lr=0.1)

    sgd = counting_sgd()
    for _ in range(3):
        model(torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (1, 6))).backward()
        sgd.step()
        model.zero_grad()
    sgd.state[params[1]]["count"] = 7  # one parameter's number differs from the others'
    expected = {pid: s["count"] for pid, s in sgd.state_dict()["state"].items()}
    path = checkpoint.save(tmp_path, 3, model, [sgd], {}, keep=1, tokenizer=Tokenizer.load(step_folder / "tokenizer.json"))
    again = counting_sgd()
    checkpoint.load(path, model, [again])
    assert {pid: s["count"] for pid, s in again.state_dict()["state"].items()} == expected
    assert expected[1] == 7 and len(expected) == len(params)
    assert set(again.state_dict()["state"][5]) == {"count"} and "momentum_buffer" in again.state_dict()["state"][0]


def test_checkpoint_loads_into_a_one_rank_fsdp_model_with_sharded_optimizer_state(step_folder):
    """Under FSDP the parameters are DTensors: the full tensors of the folder are cut like them, the
    weights and AdamW's moments alike (a step count is not), so training goes on. A one-rank gloo group
    in this process; the values against the safetensors files read directly (mutants: the moments
    left whole, or every state entry cut, or cut like nothing)."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hybridchat.infra import checkpoint

    weights = load_file(str(step_folder / "model.safetensors"))
    moments = load_file(str(step_folder / "optimizer.safetensors"))
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = HybridLM(CKPT_MODEL, vocab_size=300)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        checkpoint.load(step_folder, model, [opt])
        names = [n for n, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and torch.equal(p.full_tensor(), weights[name]), name
        for pid, state in opt.state_dict()["state"].items():
            assert isinstance(state["exp_avg"], DTensor) and not isinstance(state["step"], DTensor), names[pid]
            assert torch.equal(state["exp_avg"].full_tensor(), moments[f"0.{pid}.exp_avg"]), names[pid]
            assert torch.equal(state["step"], moments[f"0.{pid}.step"])
        model(torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (1, 6))).backward()
        opt.step()  # moments and parameters laid out alike: the step runs
    finally:
        dist.destroy_process_group()


def test_weights_file_with_missing_or_extra_tensors_is_refused_naming_them(step_folder, tmp_path):
    """A model.safetensors that lacks tensors, or holds ones the model has not, is one UserError naming
    the first five keys (mutants: `or` -> `and`, which lets either through alone; strict loading; six
    named)."""
    from safetensors.torch import load_file, save_file

    from hybridchat.infra import checkpoint

    weights = load_file(str(step_folder / "model.safetensors"))
    unchecked = edited_copy(step_folder, tmp_path / "unchecked", edit=lambda m: m.pop("sha256"))  # no checksums
    lacking = edited_copy(unchecked, tmp_path / "lacking")
    save_file({k: v for k, v in weights.items() if not k.startswith("blocks.1.")}, str(lacking / "model.safetensors"))
    with pytest.raises(UserError) as e:
        checkpoint.load(lacking, HybridLM(CKPT_MODEL, vocab_size=300))
    first_five = ["dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight"]  # of 10, in registration order
    assert str(e.value) == (f"checkpoint {lacking}/model.safetensors does not match the model: missing "
                            f"{['blocks.1.mixer.' + name for name in first_five]}, unexpected []")
    extra = edited_copy(unchecked, tmp_path / "extra")
    save_file({**weights, **{f"extra{i}": torch.zeros(2) for i in range(7)}}, str(extra / "model.safetensors"))
    with pytest.raises(UserError) as e:
        checkpoint.load(extra, HybridLM(CKPT_MODEL, vocab_size=300))
    assert str(e.value) == (f"checkpoint {extra}/model.safetensors does not match the model: missing [], "
                            f"unexpected {[f'extra{i}' for i in range(5)]}")


def test_architecture_mismatch_lists_every_difference_and_no_architecture_fits_nothing(step_folder, tmp_path):
    """Each differing setting is named with both values, joined by '; '; a meta.json without any
    architecture matches no model (mutants: the join string, `meta.get("architecture", None)`)."""
    from hybridchat.infra import checkpoint

    other = HybridLM(dataclasses.replace(CKPT_MODEL, mlp_ratio=2, qk_norm=False), vocab_size=300)
    with pytest.raises(UserError) as e:
        checkpoint.load(step_folder, other)
    assert str(e.value) == (f"checkpoint {step_folder} does not fit this model (mlp_ratio: checkpoint 1 vs config 2; "
                            f"qk_norm: checkpoint True vs config False); choose the matching model/block_pattern or "
                            f"another run_name")

    def no_architecture(meta):
        del meta["architecture"]

    bare = edited_copy(step_folder, tmp_path / "bare", no_architecture)
    with pytest.raises(UserError, match=r"does not fit this model \(block_pattern: checkpoint None vs config 'AM'; "
                                        r"vocab_size: checkpoint None vs config 300; n_layer"):
        checkpoint.load(bare, HybridLM(CKPT_MODEL, vocab_size=300))


def test_architecture_names_a_mixers_settings_only_where_the_pattern_has_it(step_folder):
    """Hand lists of the keys; and a Mamba setting that differs (d_state) is refused by name before any
    tensor is copied (mutants: the Mamba keys left out, or listed only for models without Mamba)."""
    from hybridchat.infra import checkpoint

    common = ["block_pattern", "vocab_size", "n_layer", "n_embd", "mlp_ratio", "mlp", "mlp_hidden", "norm_weights",
              "norm_eps", "embed_norm", "tie_embeddings", "pointer", "request_match"]
    attention = ["n_head", "n_kv_head", "attn_rope", "rope_base", "qk_norm", "qkv_bias"]
    mamba = ["mamba_mlp", "d_state", "d_conv", "expand", "headdim", "ngroups"]
    for pattern, keys in (("A", common + attention), ("M", common + mamba), ("AM", common + attention + mamba)):
        model = HybridLM(dataclasses.replace(CKPT_MODEL, block_pattern=pattern), vocab_size=300)
        assert list(model.architecture()) == keys, pattern
    # The pointer's width is n_embd / n_head: a pure Mamba model with a pointer names n_head too.
    pointed = HybridLM(dataclasses.replace(CKPT_MODEL, block_pattern="M", pointer=True), vocab_size=300)
    assert list(pointed.architecture()) == common + ["n_head"] + mamba
    with pytest.raises(UserError, match=r"does not fit this model \(d_state: checkpoint 8 vs config 16\)"):
        checkpoint.load(step_folder, HybridLM(dataclasses.replace(CKPT_MODEL, d_state=16), vocab_size=300))


# ---- finding step folders and reading meta.json --------------------------------------------------

def test_find_gives_the_latest_or_the_asked_step_or_says_what_to_run(tmp_path):
    """find() against folders made by hand: only step folders with meta.json count."""
    from hybridchat.infra import checkpoint

    stage = tmp_path / "run1" / "pretrain"
    for name in ("step_000002", "step_000010"):
        (stage / name).mkdir(parents=True)
        (stage / name / "meta.json").write_text("{}")
    (stage / "step_000011").mkdir()  # an interrupted save: no meta.json
    assert checkpoint.find(tmp_path, "run1", "pretrain") == stage / "step_000010"
    assert checkpoint.find(str(tmp_path), "run1", "pretrain", step=2) == stage / "step_000002"
    with pytest.raises(UserError) as e:
        checkpoint.find(tmp_path, "run1", "pretrain", step=11)
    assert str(e.value) == f"no checkpoint {stage / 'step_000011'}; {stage} holds ['step_000002', 'step_000010']"
    with pytest.raises(UserError) as e:
        checkpoint.find(tmp_path, "run2", "mid", step=3)
    assert str(e.value) == f"no checkpoint {tmp_path / 'run2' / 'mid' / 'step_000003'}; " \
                           f"{tmp_path / 'run2' / 'mid'} holds none"
    with pytest.raises(UserError) as e:
        checkpoint.find(tmp_path, "run2", "mid")
    assert str(e.value) == (f"{tmp_path / 'run2' / 'mid'} holds no checkpoint: train it first with python -m "
                            f"hybridchat.train stage=mid run_name=run2 (and the same model=...)")


def test_at_path_takes_a_step_folder_or_the_latest_step_of_a_stage_folder(tmp_path):
    """checkpoint.at_path against folders made by hand: only step folders with meta.json count."""
    from hybridchat.infra import checkpoint

    stage = tmp_path / "pretrain"
    for name in ("step_000003", "step_000012"):
        (stage / name).mkdir(parents=True)
        (stage / name / "meta.json").write_text("{}")
    (stage / "step_000013").mkdir()  # no meta.json: not a checkpoint
    assert checkpoint.at_path(str(stage / "step_000003")) == stage / "step_000003"
    assert checkpoint.at_path(stage) == stage / "step_000012"
    for path in (stage / "step_000013", tmp_path / "nowhere"):
        with pytest.raises(UserError) as e:
            checkpoint.at_path(path)
        assert str(e.value) == f"{path} is neither a checkpoint step folder (with meta.json) nor a folder of them"


def test_unreadable_checkpoint_metadata_is_one_line_naming_the_error(tmp_path):
    """read_meta's UserError carries the error's type and its text on one line, cut at 200 characters;
    JSON that is not an object is refused as not a checkpoint's (mutants: the type of None named, the
    words joined by something else, the text of None, 201 characters, the dict check skipped)."""
    from hybridchat.infra.checkpoint import read_meta

    bad_json = tmp_path / "bad"
    bad_json.mkdir()
    (bad_json / "meta.json").write_text("{\n  \"step\":   }")
    with pytest.raises(UserError) as e:
        read_meta(bad_json)
    assert str(e.value) == (f"checkpoint metadata {bad_json / 'meta.json'} is unreadable or corrupted "
                            f"(JSONDecodeError: Expecting value: line 2 column 13 (char 14))")
    deep = tmp_path / ("long-folder-name-" * 12)
    (deep / "meta.json").mkdir(parents=True)  # a folder where the file should be: IsADirectoryError
    with pytest.raises(UserError) as e:
        read_meta(deep)
    text = f"[Errno 21] Is a directory: '{deep / 'meta.json'}'"
    assert len(text) > 200
    assert str(e.value) == (f"checkpoint metadata {deep / 'meta.json'} is unreadable or corrupted "
                            f"(IsADirectoryError: {text[:200]})")
    listed = tmp_path / "list"
    listed.mkdir()
    (listed / "meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a hybridchat checkpoint's"):
        read_meta(listed)


def test_metadata_format_version_absent_means_0_and_newer_is_refused(tmp_path):
    """meta.json without format_version is a version-0 checkpoint and loads; a version that is not an
    integer (a string, a boolean) is not a checkpoint's; a newer version than this hybridchat reads is
    one UserError asking for an upgrade (mutants: another key or default read, `or` -> `and`)."""
    from hybridchat.infra.checkpoint import FORMAT_VERSION, read_meta

    (tmp_path / "meta.json").write_text('{"step": 3}')
    assert read_meta(tmp_path) == {"step": 3}
    for version in ('"2"', "true", "1.0"):
        (tmp_path / "meta.json").write_text(f'{{"format_version": {version}}}')
        with pytest.raises(UserError, match="expected a JSON object with an integer format_version"):
            read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(f'{{"format_version": {FORMAT_VERSION + 1}, "step": 3}}')
    with pytest.raises(UserError) as e:
        read_meta(tmp_path)
    assert str(e.value) == (f"checkpoint {tmp_path} has format_version {FORMAT_VERSION + 1}; this hybridchat reads "
                            f"up to {FORMAT_VERSION}: upgrade hybridchat")


# ---- saving and pruning --------------------------------------------------------------------------

def tiny_save(directory, step, keep, meta=None):
    from hybridchat.infra import checkpoint

    model = HybridLM(dataclasses.replace(TOY_MODEL, block_pattern="A"), vocab_size=TOY_VOCAB)
    return checkpoint.save(directory, step, model, [], meta or {}, keep=keep, tokenizer=StubTokenizer())


def test_save_prunes_only_with_a_positive_keep_and_skips_what_it_cannot_delete(tmp_path):
    """keep <= 0 keeps every checkpoint; keep = 1 removes the older ones, and one it cannot remove (a
    symlinked step folder: rmtree refuses links) is left without failing the save (mutants: the keep
    test dropped, rmtree errors raised)."""
    from hybridchat.infra import checkpoint

    for step, keep in ((1, 0), (2, -1), (3, 0)):
        tiny_save(tmp_path / "all", step, keep)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "all")] == ["step_000001", "step_000002",
                                                                               "step_000003"]
    elsewhere = tiny_save(tmp_path / "elsewhere", 1, 1)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "step_000001").symlink_to(elsewhere, target_is_directory=True)
    tiny_save(tmp_path / "linked", 2, 1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "linked")] == ["step_000001", "step_000002"]
    assert (tmp_path / "linked" / "step_000001").is_symlink() and (elsewhere / "meta.json").is_file()


def test_meta_json_writes_values_json_cannot_hold_as_strings(tmp_path):
    """meta.json holds str() of what JSON has no type for (a path, a date) instead of failing the save."""
    import datetime
    from pathlib import Path

    from hybridchat.infra import checkpoint

    when = datetime.date(2026, 11, 28)
    path = tiny_save(tmp_path, 1, 1, {"source": Path("/runs/a/step_000003"), "when": when})
    meta = checkpoint.read_meta(path)
    assert (meta["source"], meta["when"], meta["format_version"], meta["step"]) == \
        ("/runs/a/step_000003", "2026-11-28", 1, 1)


def test_save_never_prunes_protected_steps(tmp_path):
    from hybridchat.infra import checkpoint

    for step in range(1, 6):
        checkpoint_path = tiny_save(tmp_path, step, 2)
        assert checkpoint_path.name == f"step_{step:06d}"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    model = HybridLM(dataclasses.replace(TOY_MODEL, block_pattern="A"), vocab_size=TOY_VOCAB)
    for step in range(6, 10):
        checkpoint.save(tmp_path, step, model, [], {}, keep=1, tokenizer=StubTokenizer(), protect={4, 7})
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000004", "step_000007", "step_000009"]


def test_bytes_damaged_inside_a_file_are_refused_by_name_and_older_folders_without_checksums_load(
        step_folder, tmp_path):
    """4 KB of random bytes inside model.safetensors (size unchanged) loaded without complaint and the
    model answered garbage at confidence nan; a changed tokenizer.json or optimizer state likewise.
    Checked against hashlib over the files as saved, not against the code's own recording."""
    import hashlib
    import json

    from hybridchat.infra import checkpoint

    meta = json.loads((step_folder / "meta.json").read_text())
    assert meta["sha256"] == {name: hashlib.sha256((step_folder / name).read_bytes()).hexdigest()
                              for name in ("model.safetensors", "optimizer.safetensors", "tokenizer.json")}
    for name in ("model.safetensors", "optimizer.safetensors", "tokenizer.json"):
        damaged = edited_copy(step_folder, tmp_path / name)
        data = bytearray((damaged / name).read_bytes())
        middle = len(data) // 2
        size = min(4096, len(data) // 4)
        data[middle:middle + size] = bytes(b ^ 0x5A for b in data[middle:middle + size])
        (damaged / name).write_bytes(bytes(data))
        model = HybridLM(CKPT_MODEL, vocab_size=300)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with pytest.raises(UserError, match=f"{damaged / name} is corrupted: its sha256 differs"):
            checkpoint.load(damaged, model, [opt])
    older = edited_copy(step_folder, tmp_path / "older", edit=lambda m: m.pop("sha256"))
    assert load_run(older).meta["step"] == 7
