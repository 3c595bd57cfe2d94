from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gmoe_bench.config import CONFIG_DIR, IDENTITY_NEUTRAL, config_identity, validate
from gmoe_bench.errors import ConfigError


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_defaults_are_ogb_protocol() -> None:
    cfg = validate(composed())
    assert (cfg.model.num_layers, cfg.model.hidden_dim, cfg.model.dropout) == (5, 300, 0.5)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.lr) == (100, 32, 1e-3)
    assert cfg.model.pooling == "mean" and not cfg.model.virtual_node
    assert cfg.moe.num_experts == 0 and cfg.dataset.drop_node_p == 0.0


def test_mirror_defaults_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GMOE_DATA_MIRROR", "/somewhere/ogb")
    assert validate(composed()).dataset.mirror == "/somewhere/ogb"
    monkeypatch.delenv("GMOE_DATA_MIRROR")
    assert validate(composed()).dataset.mirror is None


def test_gmoe_group_and_overrides() -> None:
    cfg = validate(composed("model=gin", "moe=gmoe", "moe.top_k=2", "dataset=ogbg-molhiv"))
    assert (cfg.model.backbone, cfg.moe.num_experts, cfg.moe.num_hop2, cfg.moe.top_k) == (
        "gin", 8, 4, 2)
    assert cfg.dataset.name == "ogbg-molhiv"


@pytest.mark.parametrize(("overrides", "message"), [
    (["moe.num_experts=4", "moe.top_k=5"], "moe.top_k=5 must be between 1 and"),
    (["moe.num_experts=4", "moe.num_hop2=5"], "moe.num_hop2=5"),
    (["moe.num_experts=-1"], "moe.num_experts=-1 must be >= 0"),
    (["moe.num_experts=4", "moe.loss_weight=-0.1"], "λ"),
    (["model.num_layers=1"], "at least 2"),
    (["seeds=[]"], "seeds is empty"),
    (["model.backbone=gat"], "model.backbone='gat' is not one of gcn, gin"),
    (["trainer.lr=-0.001"], "trainer.lr=-0.001 must be a positive"),
    (["dataset.name=cora"], "not an OGB molecular dataset"),
    (["+moe.topk=2"], "Valid keys are: .*moe.top_k"),
    (["trainer.epochs=ten"], "trainer.epochs"),
])
def test_bad_values_are_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(composed(*overrides))


# Identities stored by earlier runs (their checkpoint folders are named by them): a change to the
# config that breaks one orphans every checkpoint of that configuration.
STORED_IDENTITIES = {
    (): "e63e5632",
    ("preset=official", "model.hidden_dim=300"): "3540d924",
    ("preset=official", "moe=gmoe", "experts=n8_hop1", "moe.top_k=4"): "1dea1af5",
}


@pytest.mark.parametrize(("overrides", "identity"), STORED_IDENTITIES.items())
def test_identities_of_existing_runs_do_not_change(overrides: tuple[str, ...], identity: str) -> None:
    config = OmegaConf.to_container(composed(*overrides, "trainer.cpu_threads=1",
                                             "trainer.checkpoint_dir=/elsewhere"), resolve=True)
    assert config_identity(config) == identity


def test_a_new_key_at_its_neutral_value_keeps_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    config = OmegaConf.to_container(composed(), resolve=True)
    monkeypatch.setitem(IDENTITY_NEUTRAL, "moe.capacity_factor", 1.0)
    assert config_identity({**config, "moe": {**config["moe"], "capacity_factor": 1.0}}) == "e63e5632"
    assert config_identity({**config, "moe": {**config["moe"], "capacity_factor": 2.0}}) != "e63e5632"


def test_gate_is_a_checked_choice_and_part_of_the_identity() -> None:
    with pytest.raises(ConfigError, match=r"moe\.gate='softmax' is not one of top_k, dense, "
                                          r"expert_choice, random"):
        validate(composed("moe=gmoe", "moe.gate=softmax"))
    assert validate(composed("moe=gmoe", "moe.gate=expert_choice")).moe.gate == "expert_choice"
    top_k, choice = (OmegaConf.to_container(composed("moe=gmoe", f"moe.gate={g}"), resolve=True)
                     for g in ("top_k", "expert_choice"))
    without = {**top_k, "moe": {k: v for k, v in top_k["moe"].items() if k != "gate"}}
    assert config_identity(top_k) == config_identity(without) != config_identity(choice)
