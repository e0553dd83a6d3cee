"""Every option of every config group composes into a valid typed config; bad configs fail clearly."""

import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, compose_config, group_options
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import hybridchat.chat  # noqa: F401  registers chat_schema (conf/chat.yaml's)
import hybridchat.evaluate  # noqa: F401  registers eval_schema (conf/eval.yaml's)
import hybridchat.kb
import hybridchat.plan  # noqa: F401  registers plan_schema (conf/plan.yaml's)
import hybridchat.qa
import hybridchat.report
import hybridchat.serve.config
from hybridchat.core.errors import UserError
from hybridchat.data.sources import build_source
from hybridchat.infra.config import Config
from hybridchat.infra.runtime import grad_accum_steps
from hybridchat.model.blocks import PATTERN_PRESETS, expand_pattern
from hybridchat.model.lm import HybridLM, check_sizes
from hybridchat.train import typed_config

GROUPS = ["model", "model/block_pattern", "gpu", "stage", "data", "retriever", "logger", "experiment"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "text":
        overrides.append("data.path=/tmp")
    cfg = compose_config(overrides)
    config, resolved = typed_config(cfg)
    assert isinstance(config, Config)
    assert resolved["run_name"]
    if group == "model":
        assert config.model.name == option
    if group == "gpu":
        assert config.gpu.name == option


def test_groups_have_the_options_the_readme_promises():
    assert {"cpu", "rtx3070", "rtx3080", "rtx3090", "rtx4070", "rtx4080", "rtx4090", "rtx5090", "a100",
            "h100"} <= set(group_options("gpu"))
    assert {f"{f}_{s}" for f in ("transformer", "mamba", "hybrid") for s in ("tiny", "d12", "d20")} <= set(
        group_options("model"))
    assert {"all_attention", "all_mamba", "alternating", "early_attention_late_mamba", "jamba"} <= set(
        group_options("model/block_pattern"))


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_instantiates(model):
    config, _ = typed_config(compose_config([f"model={model}"]))
    device = "cpu" if model.endswith("tiny") else "meta"  # big sizes: shapes only, no memory
    with torch.device(device):
        lm = HybridLM(config.model, vocab_size=4096 if model.endswith("tiny") else 32768)
    n = lm.num_params()
    assert len(lm.pattern) == config.model.n_layer
    if model.endswith("tiny"):
        assert 1e6 < n < 2e7
    if model.endswith("d20"):
        assert 3e8 < n < 9e8, f"{model} has {n / 1e6:.0f}M params, expected ~0.5B"
    if model.startswith("transformer"):
        assert set(lm.pattern) == {"A"}
    if model.startswith("mamba"):
        assert set(lm.pattern) == {"M"}
    if model.startswith("hybrid"):
        assert set(lm.pattern) == {"A", "M"} and lm.pattern[0] == "M"


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_fits_every_gpu_preset_with_the_default_stage(model):
    """`model=hybrid_d20 gpu=rtx4090` must train as composed: the batch arithmetic always works."""
    for gpu in group_options("gpu"):
        config, _ = typed_config(compose_config([f"model={model}", f"gpu={gpu}"]))
        assert grad_accum_steps(config.stage.total_batch_tokens, config.gpu.micro_batch, config.model.sequence_len,
                                world_size=8) == 1


def test_block_pattern_group_and_inline_string():
    cfg = compose_config(["model=hybrid_tiny", "model/block_pattern=all_attention"])
    assert cfg.model.block_pattern == "all_attention"
    cfg = compose_config(["model=hybrid_tiny", "model.block_pattern=MMAM"])
    assert cfg.model.block_pattern == "MMAM"


def test_pattern_presets_follow_the_literature():
    assert expand_pattern("jamba", 16) == "MMMMAMMMMMMMAMMM"
    assert expand_pattern("alternating", 4) == "MAMA"
    assert expand_pattern("early_attention_late_mamba", 8) == "AAMMMMMM"
    nemotron = expand_pattern("nemotron", 52)
    assert nemotron[0] == "M" and 3 <= nemotron.count("A") <= 5
    for name, rule in PATTERN_PRESETS.items():
        for n in (1, 2, 4, 12, 20):
            assert len(rule(n)) == n, name
    assert expand_pattern("AM", 6) == "AMAMAM"  # tiled
    assert expand_pattern("mmam", 4) == "MMAM"  # given in full, case-insensitive


@pytest.mark.parametrize("pattern,needle", [("", "empty"), ("AMX", "unknown letter"), ("AMM", "divides")])
def test_malformed_block_pattern_is_one_clear_error(pattern, needle):
    with pytest.raises(UserError, match=needle) as e:
        expand_pattern(pattern, 4)
    assert "model.block_pattern" in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("model.n_head=3", "model.n_head"),
    ("model.n_kv_head=3", "model.n_kv_head"),
    ("model.headdim=48", "model.headdim"),
])
def test_sizes_that_do_not_divide(override, key):
    config, _ = typed_config(compose_config([override]))
    with pytest.raises(UserError, match=key):
        check_sizes(config.model)


def test_typo_in_gpu_preset_key_is_a_compose_error():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["gpu.micro_bacth=4"])
    assert "micro_bacth" in str(e.value.__cause__ or e.value)


def test_wrong_type_is_a_compose_error():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["gpu.memory_gb=lots"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["gpu.dtype=float8"])


def test_unknown_group_option_names_the_available_ones():
    with pytest.raises(MissingConfigException) as e:
        compose_config(["model=transformer_huge"])
    assert "transformer_tiny" in str(e.value)


def test_missing_data_path_is_reported_by_key():
    config, _ = typed_config(compose_config(["data=text"]))
    with pytest.raises(UserError, match="data.path"):
        build_source(config.data, Path(config.paths.data), world=None)


def test_nonexistent_data_path_is_reported(tmp_path):
    config, _ = typed_config(compose_config(["data=text", f"data.path={tmp_path}/nowhere"]))
    with pytest.raises(UserError, match="does not exist"):
        build_source(config.data, Path(config.paths.data), world=None)


def test_run_name_defaults_to_the_model_choice():
    cfg = compose_config(["model=mamba_tiny"])
    assert OmegaConf.to_container(cfg, resolve=True)["run_name"] == "mamba_tiny"


def test_experiment_only_states_differences():
    base = OmegaConf.to_container(compose_config([]), resolve=True)
    for option in group_options("experiment"):
        exp = OmegaConf.to_container(compose_config([f"experiment={option}"]), resolve=True)
        changed = {k for k in base if base[k] != exp[k]}
        assert changed, f"experiment={option} changes nothing"


# Option groups whose files are merged onto one node of their app's schema; experiment/ and debug/ are
# left out: they override other options, so a value equal to the schema's may be an override there.
OPTION_FILES = sorted(str(p.relative_to(CONF_DIR)) for p in CONF_DIR.glob("*/**/*.yaml")
                      if p.relative_to(CONF_DIR).parts[0] not in ("hydra", "experiment", "debug"))
PRIMARY_FILES = ["config.yaml", "eval.yaml", "plan.yaml", "chat.yaml", "serve.yaml", "kb.yaml", "qa.yaml", "report.yaml",
                 "import.yaml"]
hybridchat.kb.register()  # kb_schema (conf/kb.yaml's): kb registers it when it composes
hybridchat.qa.register()  # qa_schema, likewise
hybridchat.report.register()  # report_schema, likewise
hybridchat.serve.config.register()  # serve_schema, likewise
importlib.import_module("hybridchat.import").register()  # import_schema (`import` is a keyword: no statement)


def restated_defaults(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    """The keys of `values` (a yaml file's) that repeat `defaults` (the schema's) word for word."""
    found = []
    for key, value in values.items():
        default = defaults.get(key, KeyError)
        if isinstance(value, dict) and isinstance(default, dict):
            found += restated_defaults(value, default, f"{prefix}{key}.")
        elif value == default:
            found.append(prefix + key)
    return found


def stored_schema(name: str) -> dict:
    """A schema as registered in Hydra's ConfigStore (what `defaults: [<name>]` merges onto)."""
    return OmegaConf.to_container(ConfigStore.instance().load(f"{name}.yaml").node)


@pytest.mark.parametrize("path", OPTION_FILES + PRIMARY_FILES)
def test_yaml_files_state_only_what_differs_from_the_schema(path):
    """Every default lives in the dataclass schema alone: a yaml key equal to it is a second copy
    that silently goes stale when the schema's default changes."""
    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / path)) or {}
    own_schema = [d for d in values.pop("defaults", []) if isinstance(d, str) and d.endswith(("_schema", "base_config"))]
    if path in PRIMARY_FILES:  # its own keys; the groups' nodes are their option files' business
        groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
        values = {k: v for k, v in values.items() if k not in groups}
        schema = stored_schema(own_schema[0])
    elif own_schema:  # conf/stage/<name>.yaml: its own stage class
        schema = stored_schema(f"{path.split('/')[0]}/{own_schema[0]}")
    else:  # merged onto the training schema's node of its group (model/block_pattern is @package model)
        schema = stored_schema("base_config")[path.split("/")[0]]
    assert restated_defaults(values, schema) == []


def test_smoke_debug_shrinks_everything():
    config, _ = typed_config(compose_config(["debug=smoke"]))
    assert config.stage.num_steps <= 10 and config.model.n_embd <= 64
    assert config.progress  # a smoke run is watched too: it turned the progress bar off


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_options_compose(launcher, target):
    from hydra.core.hydra_config import HydraConfig

    compose_config([f"hydra/launcher={launcher}"])
    settings = HydraConfig.get().launcher
    assert settings._target_.endswith(target) and settings.timeout_min > 0


@pytest.mark.parametrize("stage", group_options("stage"))
def test_each_stage_has_its_own_schema_and_smoke_sizes(stage):
    from hybridchat.training.stages import stage_classes

    config, _ = typed_config(compose_config([f"stage={stage}", "debug=smoke"]))
    assert type(config.stage) is stage_classes()[stage].config_class and config.stage.name == stage
    assert config.stage.num_steps <= 10


def test_a_key_of_another_stage_is_a_compose_error():
    typed_config(compose_config(["stage=rag", "stage.max_documents=2"]))
    with pytest.raises(ConfigCompositionException, match="max_documents"):
        compose_config(["stage=pretrain", "stage.max_documents=2"])


def test_one_world_for_data_and_knowledge_base_validated_at_start():
    config, _ = typed_config(compose_config(["world.n_people=50", "world.seed=3"]))
    assert (config.world.n_people, config.world.seed) == (50, 3)
    with pytest.raises(UserError, match="world.n_people"):
        typed_config(compose_config(["world.n_people=0"]))


def test_runs_started_within_one_second_get_folders_of_their_own(monkeypatch):
    from hybridchat.infra.config import run_stamp

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    second = 1_800_000_000  # a whole second: the two runs start 0.25 s and 0.75 s after it
    stamps = []
    for offset in (0.25, 0.75):
        monkeypatch.setattr("hybridchat.infra.config.time.time", lambda: second + offset)
        stamps.append(run_stamp())
    day_time = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(second))
    assert stamps == [f"{day_time}.250", f"{day_time}.750"]


@pytest.mark.parametrize("app,run,sweep", [("config", "runs/{}", "sweeps/{}"), ("eval", "runs/{}", "sweeps/{}"),
                                           ("plan", "plans/{}", "plans/{}-multirun")])
def test_run_and_sweep_folders_of_every_app_are_named_to_the_millisecond(app, run, sweep, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("HYBRIDCHAT_RUN_DIR", raising=False)
    second = 1_800_000_000
    monkeypatch.setattr("hybridchat.infra.config.time.time", lambda: second + 0.25)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra = compose(app, overrides=["paths.outputs=out"], return_hydra_config=True).hydra
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(second)) + ".250"
    assert (hydra.run.dir, hydra.sweep.dir) == ("out/" + run.format(stamp), "out/" + sweep.format(stamp))


def test_the_jobs_of_one_sweep_share_its_folder(tmp_path):
    """The stamp is resolved when the launcher makes the sweep folder and Hydra hands that resolution
    to every job: a stamp resolved per job would split the sweep, one folder a millisecond."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYBRIDCHAT_RUN_DIR", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "hybridchat.plan", "-m", "n_gpus=[1],[2]", f"paths.outputs={tmp_path}"],
                            cwd=CONF_DIR.parent, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    sweeps = list((tmp_path / "plans").glob("*/*"))
    assert len(sweeps) == 1 and re.fullmatch(r"\d\d-\d\d-\d\d\.\d{3}-multirun", sweeps[0].name), sweeps
    assert sorted(p.parent.name for p in sweeps[0].glob("*/plan.json")) == ["0", "1"]


@pytest.mark.parametrize("override, says", [
    ("stage.num_steps=0", "stage.num_steps=0 must be >= 1"),
    ("stage.num_steps=-3", "stage.num_steps=-3 must be >= 1"),
    ("stage.matrix_lr=-0.01", "stage.matrix_lr=-0.01 must be >= 0"),
    ("stage.embedding_lr=-0.01", "stage.embedding_lr=-0.01 must be >= 0"),
    ("stage.eval_every=0", "stage.eval_every=0 must be >= 1"),
    ("stage.warmdown_ratio=1.5", "stage.warmdown_ratio=1.5 must be in [0, 1]"),
    ("stage.grad_clip=0", "stage.grad_clip=0.0 must be > 0"),
    ("stage.total_batch_tokens=0", "stage.total_batch_tokens=0 must be >= 1"),
])
def test_stage_keys_out_of_range_are_one_line_before_anything_is_built(override, says):
    """Were: the optimizer's ValueError traceback (matrix_lr), accepted silently (embedding_lr), a
    folder step_-00003 (num_steps=-3)."""
    with pytest.raises(UserError, match=re.escape(says)):
        typed_config(compose_config(["stage=rag", override]))


def test_stage_keys_at_their_bounds_are_accepted():
    config, _ = typed_config(compose_config(["stage.num_steps=1", "stage.warmup_steps=0", "stage.matrix_lr=0",
                                             "stage.keep_checkpoints=0", "stage.final_lr_frac=1"]))
    assert config.stage.num_steps == 1 and config.stage.keep_checkpoints == 0
