"""Typed schema of the composed Hydra config, and its validation.

The YAML files under ``gmoe_bench/configs/`` (:data:`CONFIG_DIR`) hold every value; the dataclasses
below only name the keys and their types (no defaults: a key the YAML does not set is an error, not
a silent default).
:func:`validate` merges the composed config into the schema, so an unknown key, a wrong type or an
out-of-range value is one clear :class:`~gmoe_bench.errors.ConfigError` before any data is touched.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gmoe_bench.errors import ConfigError
from gmoe_bench.records import flatten

# Shipped inside the package, so a wheel or a non-editable install finds them too.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")

BACKBONES = ("gcn", "gin")
POOLINGS = ("mean", "sum", "max")
COMBINES = ("sum", "mean")
DISPATCHES = ("sparse", "dense")
GATES = ("top_k", "dense", "expert_choice", "random")  # gmoe_bench/model/gate.py
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = MISSING
    mirror: str | None = MISSING
    drop_node_p: float = MISSING


@dataclass
class ModelConfig:
    backbone: str = MISSING
    num_layers: int = MISSING
    hidden_dim: int = MISSING
    dropout: float = MISSING
    virtual_node: bool = MISSING
    pooling: str = MISSING


@dataclass
class MoEConfig:
    num_experts: int = MISSING
    num_hop2: int = MISSING
    top_k: int = MISSING
    loss_weight: float = MISSING
    noisy_gating: bool = MISSING
    combine: str = MISSING
    dispatch: str = MISSING
    scale_hidden: bool = MISSING
    gate: str = MISSING

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    device: str = MISSING
    num_workers: int = MISSING
    cpu_threads: int = MISSING
    checkpoint_dir: str = MISSING
    resume: bool = MISSING
    eval_batch_size: int = MISSING
    progress: bool = MISSING
    seeds_per_group: int = MISSING


@dataclass
class WandbConfig:
    mode: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    tags: list[str] = field(default_factory=list)
    name: str | None = MISSING
    timeout: float = MISSING


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seeds: list[int] = field(default_factory=list)


_SCHEMA_TREE = OmegaConf.to_container(OmegaConf.structured(TrainConfig))


def _float_keys(schema: type, prefix: str = "") -> set[str]:
    hints = get_type_hints(schema)
    keys: set[str] = set()
    for f in fields(schema):
        kind = hints[f.name]
        if is_dataclass(kind):
            keys |= _float_keys(kind, f"{prefix}{f.name}.")
        elif kind is float:
            keys.add(prefix + f.name)
    return keys


_FLOAT_KEYS = _float_keys(TrainConfig)


def valid_keys() -> list[str]:
    """Every config key of the schema, dotted (e.g. 'moe.top_k')."""
    return list(flatten(_SCHEMA_TREE))


def check_override_keys(overrides: list[str], groups: dict[str, list[str]]) -> None:
    """Reject command-line overrides Hydra cannot parse, of keys that do not exist, or choosing a
    config group option that does not exist, each with the fix (Hydra would exit 1 with its own
    message, e.g. suggest '+key=value', which only moves the error on).

    ``groups`` maps each config group to its options (``+experiment=...`` is checked too). Other
    additions (``+key``), deletions and Hydra's own keys pass.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except HydraException as err:
            # Hydra's message: "Error parsing override '...'", the problem, "See <docs>".
            problem = " ".join(line.strip() for line in str(err).splitlines() if line.strip()
                               and not line.startswith(("Error parsing override", "See ")))
            raise ConfigError(f"Cannot parse the override '{override}': {problem}; see "
                              "https://hydra.cc/docs/advanced/override_grammar/basic/ (values with "
                              "brackets or commas need quotes in the shell, e.g. 'seeds=[0,1]')."
                              ) from None
    parsed = parser.parse_overrides(overrides)
    known = set(valid_keys())
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra") or "/" in key:
            continue
        if key in groups:
            values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                      else [override.get_value_element_as_str()])
            for value in values:
                if value not in (*groups[key], "null"):
                    hint = (f" For any other OGB dataset, use dataset.name={value}."
                            if key == "dataset" else "")
                    raise ConfigError(f"{key}={value} is not one of the {key} configs "
                                      f"({', '.join(groups[key])}).{hint}")
            continue
        if key in known or override.is_add():
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown config key '{key}'.{hint} Valid keys are: "
                          f"{', '.join(sorted(known))}; config groups: {', '.join(groups)}.")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}.")


def validate(cfg: DictConfig) -> TrainConfig:
    """Check the composed config against the schema and the value ranges; return it typed."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
        typed: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"Invalid config at '{key}': {err.msg if hasattr(err, 'msg') else err}. "
            f"Valid keys are: {', '.join(valid_keys())}."
        ) from None

    d, m, moe, t = typed.dataset, typed.model, typed.moe, typed.trainer
    _require(d.name.startswith("ogbg-mol"),
             f"dataset.name={d.name!r} is not an OGB molecular dataset; use one of the ogbg-mol* "
             "names (ogbg-molhiv, ogbg-molbbbp, ogbg-moltox21, ...).")
    _require(0.0 <= d.drop_node_p < 1.0, f"dataset.drop_node_p={d.drop_node_p} must be in [0, 1).")
    _check_choice("model.backbone", m.backbone, BACKBONES)
    _check_choice("model.pooling", m.pooling, POOLINGS)
    _require(m.num_layers >= 2, f"model.num_layers={m.num_layers} must be at least 2 (OGB's GNN).")
    _require(m.hidden_dim >= 1, f"model.hidden_dim={m.hidden_dim} must be positive.")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1).")
    _require(moe.num_experts >= 0,
             f"moe.num_experts={moe.num_experts} must be >= 0 (0 means the plain backbone).")
    if moe.enabled:
        _require(1 <= moe.top_k <= moe.num_experts,
                 f"moe.top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}.")
        _require(0 <= moe.num_hop2 <= moe.num_experts,
                 f"moe.num_hop2={moe.num_hop2} (hop-2 experts) must be between 0 and "
                 f"moe.num_experts={moe.num_experts}.")
        _require(0 <= moe.loss_weight < math.inf,
                 f"moe.loss_weight={moe.loss_weight} (λ) must be a finite number >= 0.")
        _check_choice("moe.combine", moe.combine, COMBINES)
        _check_choice("moe.dispatch", moe.dispatch, DISPATCHES)
        _check_choice("moe.gate", moe.gate, GATES)
    _require(len(typed.seeds) > 0, "seeds is empty; give at least one, e.g. seeds=[0,1,2].")
    _require(len(set(typed.seeds)) == len(typed.seeds), f"seeds={typed.seeds} has duplicates.")
    _require(all(0 <= s < 2**32 for s in typed.seeds),
             f"seeds={typed.seeds}: every seed must be between 0 and 2**32 - 1 (numpy's range).")
    _require(t.epochs >= 1, f"trainer.epochs={t.epochs} must be at least 1.")
    _require(t.batch_size >= 1 and t.eval_batch_size >= 1, "batch sizes must be positive.")
    _require(t.lr > 0 and math.isfinite(t.lr), f"trainer.lr={t.lr} must be a positive number.")
    _require(t.seeds_per_group >= 1,
             f"trainer.seeds_per_group={t.seeds_per_group} must be at least 1 (1: one seed at a time).")
    _require(t.num_workers >= 0, f"trainer.num_workers={t.num_workers} must be >= 0.")
    _require(t.cpu_threads >= 0,
             f"trainer.cpu_threads={t.cpu_threads} must be >= 0 (0: this job's share of the cores).")
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
             f"trainer.device={t.device!r} must be auto, cpu, cuda or cuda:N.")
    _check_choice("logger.wandb.mode", typed.logger.wandb.mode, WANDB_MODES)
    _require(typed.logger.wandb.timeout > 0,
             f"logger.wandb.timeout={typed.logger.wandb.timeout} must be positive.")
    return typed


def expert_hidden_dim(model: ModelConfig, moe: MoEConfig) -> int:
    """Hidden size of the network: hidden_dim, or hidden_dim/sqrt(k) for GMoE with scale_hidden."""
    return network_width(model.hidden_dim, moe.num_experts, moe.top_k, moe.scale_hidden)


def network_width(hidden_dim: int, num_experts: int, top_k: int, scale_hidden: bool) -> int:
    """:func:`expert_hidden_dim` from the four values (reports read them from stored configs)."""
    if num_experts > 0 and scale_hidden:
        return max(1, round(hidden_dim / math.sqrt(top_k)))
    return hidden_dim


def describe(cfg: TrainConfig) -> str:
    """Short human name of the model, e.g. 'gcn' or 'gmoe-gcn n=8 hop2=4 k=4 λ=1' (hop2: how many
    of the n experts are hop-2 ones; the paper's m counts the hop-1 experts, n − hop2)."""
    if not cfg.moe.enabled:
        return cfg.model.backbone
    moe = cfg.moe
    gate = "" if moe.gate == "top_k" else f" gate={moe.gate}"
    return (f"gmoe-{cfg.model.backbone} n={moe.num_experts} hop2={moe.num_hop2} k={moe.top_k} "
            f"λ={moe.loss_weight:g}{gate}")


# Keys that change how a run executes but not what it computes: left out of the group identity.
EXECUTION_KEYS = ("seeds", "logger", "trainer.device", "trainer.num_workers", "trainer.progress",
                  "trainer.cpu_threads", "trainer.eval_batch_size", "trainer.checkpoint_dir",
                  "trainer.resume", "trainer.seeds_per_group", "dataset.root", "dataset.mirror")


def is_execution_key(dotted: str) -> bool:
    """Whether a dotted key (e.g. 'logger.wandb.mode') is, or lies under, an EXECUTION_KEYS entry."""
    return any(dotted == key or dotted.startswith(f"{key}.") for key in EXECUTION_KEYS)


# Keys added to the schema after identities were first stored, each with the value that computes
# what configs without it computed: at that value a key stays out of the identity, so adding a key
# never orphans the checkpoints of existing runs. Add every new computing key here.
IDENTITY_NEUTRAL: dict[str, Any] = {"moe.gate": "top_k"}


def execution_override_keys() -> list[str]:
    """Every command-line key that is an execution detail (the keys and groups in
    :data:`EXECUTION_KEYS` and everything under them): Hydra leaves them out of job folder names."""
    prefixes = tuple(f"{key}." for key in EXECUTION_KEYS)
    return sorted({*EXECUTION_KEYS, *(k for k in valid_keys() if k.startswith(prefixes))})


def config_identity(config: dict[str, Any], also_ignore: tuple[str, ...] = ()) -> str:
    """Short stable hash of what a config computes (seeds and execution details excluded).

    An int given for a float key counts as that float (``moe.loss_weight=1`` from a sweep is the
    same run as ``moe.loss_weight=1.0``); a key of :data:`IDENTITY_NEUTRAL` at its neutral value
    is left out; keys outside the schema are hashed as they are."""
    ignored = set(EXECUTION_KEYS) | set(also_ignore)

    def kept(key: str, value: Any) -> bool:
        return key not in ignored and not (key in IDENTITY_NEUTRAL
                                           and value == IDENTITY_NEUTRAL[key])

    def strip(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: strip(v, f"{key}.{k}" if key else k) for k, v in sorted(node.items())
                    if kept(f"{key}.{k}" if key else k, v)}
        if key in _FLOAT_KEYS and isinstance(node, int) and not isinstance(node, bool):
            return float(node)
        return node
    canonical = strip(config)
    return hashlib.sha1(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:8]
