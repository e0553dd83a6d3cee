"""Stages register themselves: one module (config class + stage class) and one yaml make a stage that
composes, is checked by its own schema, is built by name and trains; chat and the evaluator ask the
registry which stage answers which questions."""

import json
import shutil
import sys

import pytest
import torch
from conftest import CONF_DIR, compose_config, group_options
from hydra.errors import ConfigCompositionException

import hybridchat.training.stages as stages
from hybridchat.core.errors import UserError
from hybridchat.infra import config as config_schema
from hybridchat.infra.context import RunContext
from hybridchat.infra.runtime import Runtime
from hybridchat.train import run, typed_config

# A stage as its author writes it: pretraining whose loss is scaled by a key only it has, reported
# each step so the test sees that the yaml's value reached the class the loop ran.
SCALED_MODULE = '''
from dataclasses import dataclass

from hybridchat.training.stages import registered
from hybridchat.training.stages.pretrain import PretrainConfig, PretrainStage


@dataclass
class ScaledConfig(PretrainConfig):
    name: str = "scaled"
    loss_scale: float = 1.0


@registered
class ScaledStage(PretrainStage):
    name = "scaled"
    config_class = ScaledConfig

    def training_step(self, model, batch):
        return self.config.loss_scale * super().training_step(model, batch)

    def step_metrics(self):
        return {"scaled/loss_scale": self.config.loss_scale}
'''
SCALED_YAML = '''defaults:
  - scaled_schema
  - _self_

name: scaled
loss_scale: 0.5
'''


@pytest.fixture
def scaled_stage(tmp_path, monkeypatch):
    """stages.py's package path gains a folder holding scaled.py; a copy of conf/ gains
    stage/scaled.yaml. Returns that config folder; the registry and modules are restored after."""
    package = tmp_path / "package"
    package.mkdir()
    (package / "scaled.py").write_text(SCALED_MODULE)
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "stage" / "scaled.yaml").write_text(SCALED_YAML)
    monkeypatch.setattr(stages, "__path__", [*stages.__path__, str(package)])
    monkeypatch.setattr(stages, "_REGISTERED", dict(stages._REGISTERED))
    config_schema.register(stages.stage_schemas())
    yield conf
    sys.modules.pop(f"{stages.__name__}.scaled", None)


def test_a_stage_written_as_one_module_and_one_yaml_composes_builds_and_trains(scaled_stage, tmp_path):
    overrides = ["stage=scaled", "debug=smoke", f"paths.outputs={tmp_path / 'out'}", "run_name=s",
                 "stage.num_steps=2", "stage.eval_every=2"]
    config, _ = typed_config(compose_config(overrides, tmp_path / "run", config_dir=scaled_stage))
    assert type(config.stage).__name__ == "ScaledConfig" and config.stage.loss_scale == 0.5
    # its own schema checks its yaml: another stage's key is a compose error, as for every stage
    with pytest.raises(ConfigCompositionException, match="max_documents"):
        compose_config(overrides + ["stage.max_documents=2"], config_dir=scaled_stage)
    run(compose_config(overrides, tmp_path / "run", config_dir=scaled_stage))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["scaled/loss_scale"] for r in records if "train/loss" in r] == [0.5, 0.5]
    meta = json.loads(next((tmp_path / "out" / "checkpoints" / "s" / "scaled").glob("step_*/meta.json")).read_text())
    assert meta["stage"] == "scaled" and meta["config"]["stage"]["loss_scale"] == 0.5


def test_every_stage_yaml_has_a_registered_stage_and_every_stage_a_yaml():
    assert sorted(stages.stage_classes()) == group_options("stage")


def test_an_unknown_stage_name_is_one_error_listing_the_registered_ones():
    config, _ = typed_config(compose_config(["stage.name=nope"]))
    with pytest.raises(UserError, match=r"stage.name='nope' is unknown; allowed: "
                                        r"\['distill', 'mid', 'pretrain', 'rag', 'refrag'\]"):
        stages.build_stage(RunContext(config, Runtime(torch.device("cpu"), None)))


def test_chat_and_the_evaluator_open_rag_for_single_hop_questions_and_refrag_for_multi_hop_ones():
    assert stages.answering_stage(1).name == "rag" and stages.answering_stage(2).name == "refrag"
