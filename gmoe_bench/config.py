"""The typed config of gmoe-train: one schema with its defaults, registered with Hydra.

The dataclasses below name every key, its type and its default (OGB's protocol); choices are Enums and
each key's bounds are declared beside it (:func:`key`). ``gmoe_bench/configs/train.yaml`` composes the
config groups and presets under :data:`CONFIG_DIR` onto this schema, so Hydra itself rejects an unknown
key, a wrong type or a choice that does not exist; :func:`config_error` says such a rejection in one
sentence with its fix. :func:`validate` checks the bounds and returns the typed config, which the code
uses, summary.json stores (:func:`as_dict`) and :func:`config_identity` hashes.
"""

from __future__ import annotations

import copy
import csv
import difflib
import functools
import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from gmoe_bench.errors import ConfigError
from gmoe_bench.records import flatten

# Shipped inside the package, so a wheel or a non-editable install finds them too.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
SCHEMA_NAME = "gmoe_schema"  # the first entry of train.yaml's defaults


class Choice(str, Enum):
    """A choice of a config key: each member's name is its value, the string YAML and the command
    line give (``model.backbone=gin``), and it compares equal to that string."""

    def __str__(self) -> str:
        return self.value


class Backbone(Choice):
    gcn = "gcn"
    gin = "gin"


class Pooling(Choice):
    mean = "mean"
    sum = "sum"
    max = "max"


class Combine(Choice):
    sum = "sum"  # Σ_e g_e·expert_e(x), the paper's formula
    mean = "mean"  # that sum divided by n, the official code


class Dispatch(Choice):
    sparse = "sparse"  # each expert computes only the nodes routed to it
    dense = "dense"  # every expert on every node: the official code's reference formulation


class Gate(Choice):  # gmoe_bench/model/gate.py
    top_k = "top_k"
    dense = "dense"
    expert_choice = "expert_choice"
    random = "random"


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


def key(default: Any, *, ge: float | None = None, gt: float | None = None, lt: float | None = None,
        execution: bool = False, note: str = "") -> Any:
    """A schema field: its default, its bounds (``ge <= value``, ``gt < value``, ``value < lt``;
    :func:`validate` checks them, ``note`` says why) and whether it is an execution detail, which
    changes how a run executes but not what it computes: left out of the run's identity and of job
    folder names."""
    metadata = {"ge": ge, "gt": gt, "lt": lt, "execution": execution, "note": note}
    if isinstance(default, list | dict) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DatasetConfig:
    name: str = "ogbg-molbbbp"  # any OGB molecular dataset (ogbg-mol*); dataset=<name> picks one
    # where processed datasets live (relative: to the directory gmoe-train is started in)
    root: str = key("${oc.env:GMOE_DATA_ROOT,data}", execution=True)
    # a folder of OGB-format dataset folders (as the official zips extract) to copy from
    mirror: str | None = key("${oc.env:GMOE_DATA_MIRROR,null}", execution=True)
    # probability of dropping each atom of a training graph per step (graphs under 5 atoms: never)
    drop_node_p: float = key(0.0, ge=0, lt=1)


@dataclass
class ModelConfig:
    backbone: Backbone = Backbone.gcn  # GCN or GIN in OGB's formulation
    num_layers: int = key(5, ge=2, note="OGB's GNN")
    hidden_dim: int = key(300, ge=1)
    dropout: float = key(0.5, ge=0, lt=1)
    virtual_node: bool = False
    pooling: Pooling = Pooling.mean


@dataclass
class MoEConfig:
    # n experts per layer; experts n-num_hop2..n-1 aggregate over 2-hop paths (the paper's m is n-num_hop2)
    num_experts: int = key(0, ge=0, note="0 means the plain backbone")
    num_hop2: int = 0
    top_k: int = 1
    # λ: weight of the load-balance loss CV²(importance) + CV²(load), averaged over layers
    loss_weight: float = key(0.0, ge=0, note="λ")
    noisy_gating: bool = True  # Shazeer et al. (2017) noise on the gate logits in training
    combine: Combine = Combine.sum
    dispatch: Dispatch = Dispatch.sparse
    scale_hidden: bool = True  # hidden size model.hidden_dim / sqrt(top_k): the FLOPs of the backbone
    gate: Gate = Gate.top_k

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class TrainerConfig:
    epochs: int = key(100, ge=1)
    batch_size: int = key(32, ge=2, note="a batch of one graph is skipped: BatchNorm needs two")
    lr: float = key(1e-3, gt=0)
    device: str = key("auto", execution=True)  # auto (cuda when available, else cpu), cpu, cuda, cuda:N
    num_workers: int = key(0, ge=0, execution=True)
    # torch threads of this job; 0: its share of the cores it may use
    cpu_threads: int = key(0, ge=0, execution=True, note="0: this job's share of the cores")
    # per-seed checkpoints, keyed by dataset and config: re-running a command resumes it
    checkpoint_dir: str = key("${oc.env:GMOE_CHECKPOINT_DIR,checkpoints}", execution=True)
    resume: bool = key(True, execution=True)  # false: ignore existing checkpoints and results
    # an execution detail, except under moe.gate=expert_choice (its capacity follows the batch)
    eval_batch_size: int = key(256, ge=1, execution=True)
    progress: bool = key(True, execution=True)  # tqdm bars (silent anyway when not on a terminal)
    # seeds trained together in lockstep, as one computation (docs/grouped.md); each keeps its own
    # weights, data order, random numbers and results
    seeds_per_group: int = key(1, ge=1, execution=True, note="1: one seed at a time")
    # each training step captured once per padded batch shape and replayed as a CUDA graph
    # (docs/grouped.md): a GPU only; GMoE needs moe.dispatch=dense
    cuda_graphs: bool = key(False, execution=True)


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline  # offline: to disk (`wandb sync` uploads later); online; disabled
    project: str = "gmoe-bench"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # null: built from the config (dataset, model, experts, seed)
    timeout: float = key(15.0, gt=0, note="seconds W&B may wait for its server")


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = key(LoggerConfig(), execution=True)
    seeds: list[int] = key([0, 1, 2], execution=True)  # run one after another in this job


ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def schema_keys(schema: type = TrainConfig, prefix: str = "") -> dict[str, tuple[Any, Field]]:
    """Every key of ``schema``, dotted (e.g. 'moe.top_k'), with its type and its dataclass field;
    a nested config's own key (e.g. 'moe') comes before the keys under it."""
    hints = get_type_hints(schema)
    keys: dict[str, tuple[Any, Field]] = {}
    for f in fields(schema):
        keys[prefix + f.name] = hints[f.name], f
        if is_dataclass(hints[f.name]):
            keys |= schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def valid_keys() -> list[str]:
    """Every value key of the schema, dotted (e.g. 'moe.top_k')."""
    return [k for k, (kind, _) in schema_keys().items() if not is_dataclass(kind)]


# Keys that change how a run executes but not what it computes (key(..., execution=True)).
EXECUTION_KEYS = tuple(k for k, (_, f) in schema_keys().items() if f.metadata.get("execution"))


def is_execution_key(dotted: str) -> bool:
    """Whether a dotted key (e.g. 'logger.wandb.mode') is, or lies under, an EXECUTION_KEYS entry."""
    return any(dotted == key or dotted.startswith(f"{key}.") for key in EXECUTION_KEYS)


def execution_override_keys() -> list[str]:
    """Every command-line key that is an execution detail (the keys and groups in
    :data:`EXECUTION_KEYS` and everything under them): Hydra leaves them out of job folder names."""
    return sorted({*EXECUTION_KEYS, *filter(is_execution_key, valid_keys())})


def config_groups() -> dict[str, list[str]]:
    """Each config group under configs/ and its options (e.g. 'dataset' -> ['ogbg-molbbbp', ...])."""
    return {group.name: sorted(p.stem for p in group.glob("*.yaml"))
            for group in sorted(Path(CONFIG_DIR).iterdir()) if group.is_dir()}


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


# OGB's registry of graph property datasets, found without importing ogb (which imports torch).
OGB_MASTER_CSV = Path(importlib.util.find_spec("ogb").origin).parent / "graphproppred" / "master.csv"


@functools.cache
def ogb_molecular_datasets() -> list[str]:
    """The ogbg-mol* names in OGB's registry."""
    with OGB_MASTER_CSV.open() as f:
        return [name for name in next(csv.reader(f)) if name.startswith("ogbg-mol")]


def unknown_dataset_error(name: str) -> str | None:
    """Why ``name`` is not a dataset of OGB's molecular registry (naming the closest one), or None."""
    known = ogb_molecular_datasets()
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean dataset.name={close[0]}? " if close else ""
    return (f"dataset.name={name!r} is not one of OGB's molecular datasets; {hint}Choose one of "
            f"{', '.join(known)}.")


def config_error(err: Exception) -> ConfigError:
    """Hydra's or OmegaConf's rejection of a config (an override it cannot parse, a config group
    option, key or value that does not exist, a wrong type) as one sentence that names the fix."""
    if isinstance(err, OverrideParseException):
        # Hydra's message: the problem, then "See <docs>".
        problem = " ".join(line.strip() for line in err.message.splitlines()
                           if line.strip() and not line.startswith("See "))
        return ConfigError(f"Cannot parse the override '{err.override}': {problem}; see "
                           "https://hydra.cc/docs/advanced/override_grammar/basic/ (values with "
                           "brackets or commas need quotes in the shell, e.g. 'seeds=[0,1]').")
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, value = err.missing_cfg_file.strip("/").rpartition("/")
        hint = ""
        if group == "dataset" and value in ogb_molecular_datasets():  # OGB has it; we no config
            hint = f" For any other OGB dataset, use dataset.name={value}."
        elif close := difflib.get_close_matches(value, err.options, n=1):
            hint = f" Did you mean {group}={close[0]}?"
        return ConfigError(f"{group}={value} is not one of the {group} configs "
                           f"({', '.join(err.options)}).{hint}")
    cause = err.__cause__ if isinstance(err, HydraException) else err
    if not isinstance(cause, OmegaConfBaseException):
        return ConfigError(" ".join(str(err).split()))
    where, problem = cause.full_key, str(cause.msg).splitlines()[0]
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        if where.startswith(("hydra.launcher.", "hydra.sweeper.")):
            return ConfigError(plugin_key_error(where))
        known = valid_keys()
        close = difflib.get_close_matches(where, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"Unknown config key '{where}'.{hint} Valid keys are: "
                           f"{', '.join(known)}; config groups: {', '.join(config_groups())}.")
    kind = schema_keys().get(where, (None,))[0]
    if isinstance(kind, type) and issubclass(kind, Choice):
        return ConfigError(f"{where}={cause.value!r} is not one of {', '.join(kind)}.")
    if kind in _KINDS:
        return ConfigError(f"{where}={cause.value!r} is not {_KINDS[kind]}; e.g. "
                           f"{where}={_defaults(TrainConfig)[where]} (its default).")
    if where.partition("[")[0] == "seeds":  # seeds=0, seeds=[a]
        wanted = "a list" if where == "seeds" else "an integer"
        return ConfigError(f"{where}={cause.value!r} is not {wanted}; give a list of integer "
                           "seeds, e.g. 'seeds=[0,1,2]' (quoted in the shell).")
    return ConfigError(f"Invalid config at '{where}': {problem.rstrip('.')}.")


# Our choice that selects each Hydra launcher or sweeper plugin (configs/hydra/launcher/*.yaml,
# configs/hparams_search/*.yaml).
PLUGIN_CHOICES = {"joblib": "hydra/launcher=parallel", "submitit_slurm": "hydra/launcher=slurm",
                  "submitit_local": "hydra/launcher=slurm_local",
                  "optuna": "hparams_search=gmoe_optuna"}


def plugin_key_error(where: str) -> str:
    """Why ``hydra.launcher.<key>`` / ``hydra.sweeper.<key>`` is unknown: a key of a launcher or
    sweeper not chosen (naming the choice that has it), or a misspelling (naming the closest key)."""
    kind, _, key = where.removeprefix("hydra.").partition(".")
    plugins = ConfigStore.instance().repo["hydra"][kind]  # the plugins' own configs
    keys = {name.removesuffix(".yaml"): set(node.node) for name, node in plugins.items()
            if hasattr(node, "node")}
    having = [PLUGIN_CHOICES[name] for name, names in sorted(keys.items())
              if key in names and name in PLUGIN_CHOICES]
    if having:
        return (f"'{where}' is not a key of the {kind} this command uses; choose the {kind} that has "
                f"it first: {' or '.join(having)}.")
    close = difflib.get_close_matches(key, sorted(set().union(*keys.values())), n=1)
    hint = f"; did you mean hydra.{kind}.{close[0]}?" if close else "."
    return f"'{where}' is not a key of any {kind} gmoe-train offers{hint}"


@functools.cache
def _defaults(schema: type) -> dict[str, Any]:
    return flatten(as_dict(schema()))


def as_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The typed config as plain values (choices as their strings): summary.json's 'config'."""
    return asdict(cfg, dict_factory=lambda items: {k: v.value if isinstance(v, Choice) else v
                                                   for k, v in items})


def _bounds(dotted: str, value: Any, f: Field) -> str | None:
    """Why ``value`` breaks the bounds key() declared for ``f``, or None."""
    ge, gt, lt, note = (f.metadata.get(k) for k in ("ge", "gt", "lt", "note"))
    if isinstance(value, float) and not math.isfinite(value):
        wanted = "a finite number"
    elif ge is not None and lt is not None:
        wanted = None if ge <= value < lt else f"in [{ge:g}, {lt:g})"
    elif ge is not None:
        wanted = None if value >= ge else f">= {ge:g}"
    elif gt is not None:
        wanted = None if value > gt else ("a positive number" if gt == 0 else f"> {gt:g}")
    else:
        wanted = None
    return wanted and f"{dotted}={value} must be {wanted}{f' ({note})' if note else ''}."


def validate(cfg: DictConfig | Mapping[str, Any]) -> TrainConfig:
    """The config as the typed schema, its bounds checked; a config stored before a key existed
    gets that key's default. Raises one clear :class:`~gmoe_bench.errors.ConfigError`."""
    try:  # as plain values: a key Hydra let in ('+moe.topk=2') is then rejected, not dropped
        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        typed: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                                                 values))
    except OmegaConfBaseException as err:
        raise config_error(err) from None
    values = flatten(as_dict(typed))
    for dotted, (_, f) in schema_keys().items():
        if dotted in values and (problem := _bounds(dotted, values[dotted], f)):
            raise ConfigError(problem)

    d, moe, t = typed.dataset, typed.moe, typed.trainer
    if problem := unknown_dataset_error(d.name):  # a typo fails here, not when its job loads data
        raise ConfigError(problem)
    if moe.enabled:
        _require(1 <= moe.top_k <= moe.num_experts,
                 f"moe.top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}.")
        _require(0 <= moe.num_hop2 <= moe.num_experts,
                 f"moe.num_hop2={moe.num_hop2} (hop-2 experts) must be between 0 and "
                 f"moe.num_experts={moe.num_experts}.")
    _require(len(typed.seeds) > 0, "seeds is empty; give at least one, e.g. 'seeds=[0,1,2]'.")
    _require(len(set(typed.seeds)) == len(typed.seeds),
             f"seeds={typed.seeds} has duplicates; list each seed once.")
    _require(all(0 <= s < 2**32 for s in typed.seeds),
             f"seeds={typed.seeds}: every seed must be between 0 and 2**32 - 1 (numpy's range).")
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
             f"trainer.device={t.device!r} must be auto, cpu, cuda or cuda:N.")
    if t.cuda_graphs:
        _require(t.device != "cpu", "trainer.cuda_graphs=true needs a GPU but trainer.device=cpu; "
                 "use trainer.device=cuda or trainer.cuda_graphs=false.")
        _require(not moe.enabled or moe.dispatch == Dispatch.dense,
                 "trainer.cuda_graphs=true needs moe.dispatch=dense (sparse dispatch's shapes "
                 "follow the routing, which no captured graph can hold); set moe.dispatch=dense.")
        _require(not moe.enabled or moe.gate != Gate.expert_choice,
                 "trainer.cuda_graphs=true cannot run moe.gate=expert_choice (its capacity "
                 "follows each batch's atom count); use moe.gate=top_k or dense.")
    return typed


def check_paths(cfg: TrainConfig) -> None:
    """The folders a run about to start writes to are given (a stored config is not checked: these
    are execution details, and an empty ``dataset.mirror`` means none, as an exported empty
    ``GMOE_DATA_MIRROR`` gives it)."""
    for dotted, path in (("dataset.root", cfg.dataset.root),
                         ("trainer.checkpoint_dir", cfg.trainer.checkpoint_dir)):
        _require(path.strip() != "", f"{dotted} is empty, which would write into the current "
                 "folder; give a folder.")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


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
        return str(cfg.model.backbone)
    moe = cfg.moe
    gate = "" if moe.gate == Gate.top_k else f" gate={moe.gate}"
    return (f"gmoe-{cfg.model.backbone} n={moe.num_experts} hop2={moe.num_hop2} k={moe.top_k} "
            f"λ={moe.loss_weight:g}{gate}")


# What a run's identity (config_identity) hashes, version 1: the keys of the identities first stored
# (checkpoint folders are named by them). A key added since computes, at its default, what configs
# without it computed: it enters the hash only at another value, so adding a key keeps identities.
IDENTITY_V1 = ("dataset.name", "dataset.drop_node_p", "model.backbone", "model.num_layers",
               "model.hidden_dim", "model.dropout", "model.virtual_node", "model.pooling",
               "moe.num_experts", "moe.num_hop2", "moe.top_k", "moe.loss_weight", "moe.noisy_gating",
               "moe.combine", "moe.dispatch", "moe.scale_hidden", "trainer.epochs",
               "trainer.batch_size", "trainer.lr")


# Keys that mean nothing without experts (moe.num_experts=0). Unlike moe.combine, moe.dispatch,
# moe.scale_hidden and moe.loss_weight, which preset=official sets for its baselines too, no config
# sets them for a plain backbone, so they can leave its identity without moving any stored run.
EXPERT_ONLY_KEYS = ("moe.num_hop2", "moe.top_k", "moe.gate")


def ignored_expert_keys(config: TrainConfig) -> list[str]:
    """``key=value`` of the :data:`EXPERT_ONLY_KEYS` a plain-backbone config sets to no effect."""
    if config.moe.enabled:
        return []
    values, defaults = flatten(as_dict(config)), _defaults(type(config))
    return [f"{k}={values[k]}" for k in EXPERT_ONLY_KEYS if values[k] != defaults[k]]


def computing_execution_keys(config: TrainConfig) -> frozenset[str]:
    """The execution keys that change what this config computes, so belong to its identity:
    expert choice fills each expert to a capacity that follows the batch, in evaluation too."""
    if config.moe.enabled and config.moe.gate == Gate.expert_choice:
        return frozenset({"trainer.eval_batch_size"})
    return frozenset()


def config_identity(config: TrainConfig | Mapping[str, Any], also_ignore: tuple[str, ...] = ()) -> str:
    """Short stable hash of what a config computes: its :data:`IDENTITY_V1` keys and any key added
    since that is not at its default (execution keys never; :data:`EXPERT_ONLY_KEYS` not for the
    plain backbone). A stored config (summary.json's) is
    read through the schema first: its keys added later take their defaults, ints of float keys
    count as floats (``moe.loss_weight=1`` from a sweep is the same run as ``moe.loss_weight=1.0``)."""
    typed = config if isinstance(config, TrainConfig) else validate(config)
    values, defaults = flatten(as_dict(typed)), _defaults(type(typed))
    if not typed.moe.enabled:  # the plain backbone: the same run whatever its experts would be
        values |= {k: defaults[k] for k in EXPERT_ONLY_KEYS}
    computes = computing_execution_keys(typed)
    canonical: dict[str, Any] = {}
    for dotted, value in values.items():
        if dotted in also_ignore or (is_execution_key(dotted) and dotted not in computes) or (
                dotted not in IDENTITY_V1 and value == defaults[dotted]):
            continue
        section, _, name = dotted.rpartition(".")
        canonical.setdefault(section, {})[name] = value
    return hashlib.sha1(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:8]
