from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from gmoe_bench import config
from gmoe_bench.config import (
    CONFIG_DIR,
    EXECUTION_KEYS,
    IDENTITY_V1,
    MoEConfig,
    TrainConfig,
    as_dict,
    check_paths,
    config_error,
    config_identity,
    ignored_expert_keys,
    valid_keys,
    validate,
)
from gmoe_bench.errors import ConfigError


def composed(*overrides: str):
    """The config Hydra composes onto the schema; its rejections as gmoe-train says them."""
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    except HydraException as err:
        raise config_error(err) from None


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
    (["model.num_layers=1"], r"model.num_layers=1 must be >= 2 \(OGB's GNN\)"),
    (["seeds=[]"], "seeds is empty"),
    (["trainer.seeds_per_group=0"], r"trainer.seeds_per_group=0 must be >= 1 \(1: one seed at a time\)"),
    (["dataset.drop_node_p=1.0"], r"dataset.drop_node_p=1.0 must be in \[0, 1\)"),
    (["model.dropout=1.0"], r"model.dropout=1.0 must be in \[0, 1\)"),
    (["seeds=[0,0]"], r"seeds=\[0, 0\] has duplicates; list each seed once"),
    (["model.hidden_dim=0"], "model.hidden_dim=0 must be >= 1"),
    (["trainer.epochs=0"], "trainer.epochs=0 must be >= 1"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0 must be >= 1"),
    (["trainer.batch_size=1"], r"trainer.batch_size=1 must be >= 2 \(a batch of one graph is skipped"),
    (["model.backbone=gat"], "model.backbone='gat' is not one of gcn, gin"),
    (["model=gat"], r"model=gat is not one of the model configs \(gcn, gin\)"),
    (["model.pooling=min"], "model.pooling='min' is not one of mean, sum, max"),
    (["trainer.lr=-0.001"], "trainer.lr=-0.001 must be a positive"),
    (["dataset.name=cora"], "dataset.name='cora' is not one of OGB's molecular datasets; Choose one "
                            "of ogbg-molbace, "),
    # a typo fails when the config is checked (every sweep job before the first), not at data loading
    (["dataset.name=ogbg-molbbp"], "is not one of OGB's molecular datasets; did you mean "
                                   r"dataset.name=ogbg-molbbbp\?"),
    (["+moe.topk=2"], "Valid keys are: .*moe.top_k"),
    (["trainer.epochs=ten"], r"trainer.epochs='ten' is not an integer; e.g. trainer.epochs=100"),
    (["moe.topk=2"], "Unknown config key 'moe.topk'. Did you mean 'moe.top_k'?"),
    (["seeds=[0,1"], "Cannot parse the override 'seeds=\\[0,1'"),
    (["trainer.cuda_graphs=true", "trainer.device=cpu"],
     r"trainer.cuda_graphs=true needs a GPU but trainer.device=cpu; use trainer.device=cuda"),
    (["trainer.cuda_graphs=true", "moe=gmoe"], r"needs moe.dispatch=dense .*; set moe.dispatch=dense"),
    (["trainer.cuda_graphs=true", "moe=gmoe", "moe.dispatch=dense", "moe.gate=expert_choice"],
     "cannot run moe.gate=expert_choice"),
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
    cfg = composed(*overrides, "trainer.cpu_threads=1", "trainer.checkpoint_dir=/elsewhere")
    typed = validate(cfg)
    assert config_identity(typed) == identity
    # as summary.json stores it, and as older runs stored it (the raw tree, moe.gate absent)
    assert config_identity(as_dict(typed)) == identity
    stored = OmegaConf.to_container(cfg, resolve=True)
    del stored["moe"]["gate"]
    assert config_identity(stored) == identity


@dataclass
class LaterMoE(MoEConfig):
    capacity_factor: float = 1.0  # a key added to the schema, at a default that computes as before


@dataclass
class LaterSchema(TrainConfig):
    moe: LaterMoE = field(default_factory=LaterMoE)


def test_a_key_added_with_a_default_keeps_the_identities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "TrainConfig", LaterSchema)
    stored = OmegaConf.to_container(composed(), resolve=True)
    assert config_identity(stored) == "e63e5632"  # stored before the key existed: its default
    assert config_identity({**stored, "moe": {**stored["moe"], "capacity_factor": 1.0}}) == "e63e5632"
    assert config_identity({**stored, "moe": {**stored["moe"], "capacity_factor": 2.0}}) != "e63e5632"


def test_every_key_is_in_the_identity_or_an_execution_key() -> None:
    later = {"moe.gate"}  # added after version 1: in the identity where not at its default
    execution = [k for k in valid_keys() if config.is_execution_key(k)]
    assert sorted([*IDENTITY_V1, *later, *execution]) == sorted(valid_keys())
    assert set(EXECUTION_KEYS) >= {"seeds", "logger", "trainer.checkpoint_dir", "dataset.root"}


def test_gate_is_a_checked_choice_and_part_of_the_identity() -> None:
    with pytest.raises(ConfigError, match=r"moe\.gate='softmax' is not one of top_k, dense, "
                                          r"expert_choice, random"):
        validate(composed("moe=gmoe", "moe.gate=softmax"))
    assert validate(composed("moe=gmoe", "moe.gate=expert_choice")).moe.gate == "expert_choice"
    top_k, choice = (OmegaConf.to_container(composed("moe=gmoe", f"moe.gate={g}"), resolve=True)
                     for g in ("top_k", "expert_choice"))
    without = {**top_k, "moe": {k: v for k, v in top_k["moe"].items() if k != "gate"}}
    assert config_identity(top_k) == config_identity(without) != config_identity(choice)


@pytest.mark.parametrize("key", ["dataset.root", "trainer.checkpoint_dir"])
def test_an_empty_path_is_refused_for_a_run(key: str) -> None:
    typed = validate(composed(f"{key}=''"))  # a stored config: execution details, not checked
    with pytest.raises(ConfigError, match=rf"{key} is empty, which would write into the current "
                                          "folder; give a folder"):
        check_paths(typed)
    check_paths(validate(composed("dataset.mirror=''")))  # an exported empty GMOE_DATA_MIRROR: none


def test_expert_settings_of_a_plain_backbone_leave_it_the_same_run() -> None:
    plain = validate(composed())
    for overrides in (("moe.top_k=2",), ("moe.num_hop2=2", "moe.gate=dense")):
        typed = validate(composed(*overrides))
        assert config_identity(typed) == config_identity(plain) == "e63e5632"
    assert ignored_expert_keys(validate(composed("moe.top_k=2", "moe.gate=dense"))) == [
        "moe.top_k=2", "moe.gate=dense"]
    assert ignored_expert_keys(plain) == []
    # with experts they compute something else; keys preset=official sets for baselines still count
    assert config_identity(validate(composed("moe=gmoe", "moe.top_k=2"))) != config_identity(
        validate(composed("moe=gmoe", "moe.top_k=1")))
    assert config_identity(validate(composed("moe.combine=mean"))) != "e63e5632"


def test_eval_batch_size_counts_only_where_it_changes_results() -> None:
    """Expert choice fills each expert to a capacity that follows the batch, in evaluation too:
    there a larger evaluation batch is another run; for every other gate it is not."""
    def identity(*overrides: str) -> str:
        return config_identity(validate(composed("moe=gmoe", "trainer.cpu_threads=1", *overrides)))

    assert identity("trainer.eval_batch_size=8") == identity()
    choice = ("moe.gate=expert_choice",)
    assert identity(*choice, "trainer.eval_batch_size=8") != identity(*choice)
    assert identity(*choice, "trainer.eval_batch_size=256") == identity(*choice)  # the default
