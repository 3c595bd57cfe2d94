from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from gmoe_bench.config import CONFIG_DIR, validate
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
