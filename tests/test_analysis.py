"""Best-validation weights, the routing-structure analysis (gmoe-routing) and routing entropy."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from ogb.graphproppred import Evaluator
from omegaconf import OmegaConf
from torch_geometric.loader import DataLoader

from gmoe_bench.analysis.routing import chance_v, cramers_v
from gmoe_bench.analysis.routing import main as routing_main
from gmoe_bench.config import CONFIG_DIR, config_identity, validate
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.engine.checkpoint import SeedCheckpoint, checkpoint_directory
from gmoe_bench.engine.loop import evaluate
from gmoe_bench.model import build_model
from gmoe_bench.reports.cli import main as report_main
from gmoe_bench.reports.cli import select_main
from gmoe_bench.reports.paper import comparison_table, selection
from gmoe_bench.reports.table import (
    ConfigResult,
    collect,
    hop2_share,
    load_cv_squared,
    routing_entropy,
)
from gmoe_bench.train import train
from tests.conftest import seed_record
from tests.test_robustness import compose_cfg

GMOE = ("moe=gmoe", "moe.num_experts=4", "moe.num_hop2=2", "moe.top_k=2", "model.hidden_dim=32",
        "trainer.epochs=3")


@pytest.fixture(scope="module")
def gmoe_run(small_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-seed GMoE run on the small dataset; returns its output folder."""
    tmp_path = tmp_path_factory.mktemp("gmoe_run")
    (tmp_path / "run").mkdir()
    train(compose_cfg(tmp_path, small_mirror, "seeds=[0,1]", *GMOE), tmp_path / "run")
    return tmp_path / "run"


def test_best_weights_give_the_best_validation_metric(gmoe_run: Path) -> None:
    summary = json.loads((gmoe_run / "summary.json").read_text())
    cfg = validate(summary["config"])
    data = load_dataset(cfg.dataset)
    for seed in summary["seeds"]:
        directory = checkpoint_directory(cfg, data.name, data.fingerprint)
        path = SeedCheckpoint(directory, seed["seed"]).best_model_path
        model = build_model(cfg.model, cfg.moe, data.num_tasks)
        model.load_state_dict(torch.load(path))
        loader = DataLoader(data.graphs[data.split["valid"]], batch_size=256)
        (valid,) = evaluate([model], loader, Evaluator(data.name), torch.device("cpu"),
                            progress=False)
        assert valid == pytest.approx(seed["valid"], abs=1e-6)
        assert seed["commit"] is None or len(seed["commit"]) >= 40


def test_routing_report_counts_every_atom(gmoe_run: Path, tmp_path: Path) -> None:
    assert routing_main([str(gmoe_run), "--out", str(tmp_path / "r"), "--split", "test"]) == 0
    report = json.loads((tmp_path / "r" / "routing_structure.json").read_text())
    assert len(report) == 1 and [s["seed"] for s in report[0]["per_seed"]] == [0, 1]
    summary = json.loads((gmoe_run / "summary.json").read_text())
    data = load_dataset(validate(summary["config"]).dataset)
    test_atoms = sum(data.graphs[int(i)].num_nodes for i in data.split["test"])
    for seed in report[0]["per_seed"]:
        for prop, counts in seed["counts"].items():
            counts = np.array(counts)  # [layers, classes, experts]
            assert counts.shape[0] == 5 and counts.shape[2] == 4
            assert (counts.sum((1, 2)) == 2 * test_atoms).all(), prop  # k = 2 pairs per atom
            stats = seed["statistics"][prop]
            assert all(0.0 <= v <= 1.0 for v in stats["cramers_v"])
            pairs, hop2 = np.array(stats["class_pairs"]), np.array(stats["hop2_share"])
            np.testing.assert_allclose((hop2 * pairs).sum(1), counts[:, :, 2:].sum((1, 2)))
    ring = np.array(report[0]["per_seed"][0]["counts"]["ring"]).sum((0, 2))
    assert ring[0] > 0 and ring[1] > 0  # the small dataset has chain and ring atoms
    md = (tmp_path / "r" / "routing_structure.md").read_text()
    assert "| ring (chance ≤ " in md and "hop-2 experts are 2 of 4" in md
    for plot in ("routing_structure.png", "routing_classes.png"):
        assert (tmp_path / "r" / plot).read_bytes()[:4] == b"\x89PNG"


def test_routing_report_leaves_out_runs_that_route_to_every_expert(
        gmoe_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = json.loads((gmoe_run / "summary.json").read_text())
    summary["config"]["moe"]["gate"] = "dense"  # every atom to every expert: V would read 0
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "summary.json").write_text(json.dumps(summary))
    assert routing_main([str(tmp_path / "dense"), "--out", str(tmp_path / "r")]) == 2
    assert "a gate other than dense" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_routing_report_without_weights_names_the_fix(gmoe_run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    code = routing_main([str(gmoe_run), "--out", str(tmp_path / "r"),
                         "--checkpoint-dir", str(tmp_path / "elsewhere")])
    err = capsys.readouterr().err
    assert code == 2 and "seed_0.best.pt does not exist" in err and "--checkpoint-dir" in err
    assert not (tmp_path / "r").exists()


def test_cramers_v() -> None:
    assert cramers_v(np.diag([5, 7, 9])) == pytest.approx(1.0)
    assert cramers_v(np.outer([1, 2, 3], [4, 5])) == pytest.approx(0.0)
    assert cramers_v(np.array([[3], [4]])) == 0.0  # one expert used: nothing to associate
    partial = cramers_v(np.array([[8, 2], [2, 8]]))
    assert 0.0 < partial < 1.0
    rng = np.random.default_rng(0)
    independent = np.zeros((4, 8), dtype=int)
    np.add.at(independent, (rng.integers(0, 4, 20000), rng.integers(0, 8, 20000)), 1)
    assert cramers_v(independent) < chance_v(independent, top_k=1) * 1.5
    assert chance_v(independent, top_k=1) == pytest.approx(np.sqrt(21 / (20000 * 3)))


def test_routing_entropy_load_cv_squared_and_hop2_share() -> None:
    uniform = [[0.25] * 4, [0.25] * 4]
    assert routing_entropy(uniform) == pytest.approx(1.0)
    assert load_cv_squared(uniform) == pytest.approx(0.0)
    collapsed = [[0.5, 0.5, 0.0, 0.0]]  # k = 2 of n = 4, always the same two experts
    assert routing_entropy(collapsed) == pytest.approx(math.log(2) / math.log(4))
    assert load_cv_squared(collapsed) == pytest.approx((4 / 2 - 1) * 4 / 3)
    # mean over layers: [0.1, 0.2, 0.3, 0.4] has unbiased variance 1/60 around 0.25
    uneven = [[0.1, 0.2, 0.3, 0.4], [0.25] * 4]
    assert load_cv_squared(uneven) == pytest.approx((1 / 60 / 0.25**2) / 2)
    assert hop2_share([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], num_hop2=1) == pytest.approx(0.25)
    assert hop2_share(uniform, num_hop2=0) == 0.0


def test_comparison_with_the_paper() -> None:
    def result(backbone: str, experts: int, tests: list[float], valid: float = 0.9) -> ConfigResult:
        seeds = [{"seed": i, "valid": valid, "test": t, "epochs": [{}] * 100}
                 for i, t in enumerate(tests)]
        moe = {"num_experts": experts, "num_hop2": experts // 2, "top_k": 2, "loss_weight": 1.0}
        return ConfigResult("ogbg-molbbbp", backbone, "rocauc",
                            {"model": {"backbone": backbone}, "moe": moe,
                             "trainer": {"epochs": 100}}, seeds, label=backbone)

    wide = result("gcn", 0, [0.70])
    wide.label = "hidden=440"
    rows = comparison_table([result("gcn", 0, [0.68, 0.70]), result("gin", 8, [0.60, 0.61, 0.62]), wide])
    gcn, gmoe_gin, wide_row = rows.splitlines()[2:]
    # one seed has no spread: its value alone, not "± 0.00"
    assert wide_row == ("| GCN (hidden=440) | ogbg-molbbbp | 1 | 100 | 70.00 | n/a | "
                        "68.87 ± 1.51 | +1.13 | n/a |")
    # two seeds 68 and 70: t(0.975, 1) = 12.706, s = √2, interval 69 ± 12.706 · 1
    assert gcn == ("| GCN | ogbg-molbbbp | 2 | 100 | 69.00 ± 1.00 | [56.29, 81.71] | 68.87 ± 1.51 | "
                   "+0.13 | yes |")
    assert gmoe_gin == ("| GMoE-GIN | ogbg-molbbbp | 3 | 100 | 61.00 ± 0.82 | [58.52, 63.48] | "
                        "66.93 ± 1.72 | -5.93 | no |")

    chosen = selection([result("gin", 8, [0.6], valid=0.91), result("gin", 4, [0.7], valid=0.95),
                        result("gcn", 0, [0.7], valid=0.99), result("gcn", 8, [0.7], valid=0.99)])
    # GIN: two GMoE candidates; GCN: one GMoE configuration is no choice, the plain one no candidate
    assert chosen.count("gmoe-train") == 1
    assert ("(validation 95.00, 1 seed; lead over gin +4.00 on validation, no interval (a "
            "single seed, or no spread)); to run it with the paper's 10 seeds:") in chosen
    # the keys in which the chosen config differs from paper_selected's (λ=1 is its own)
    assert ("`gmoe-train +experiment=paper_selected model.backbone=gin moe.num_experts=4 "
            "moe.num_hop2=2 moe.top_k=2`") in chosen
    # a choice that already has the paper's seeds needs no command
    complete = selection([result("gin", 8, [0.6] * 10, valid=0.91), result("gin", 4, [0.7] * 10,
                                                                           valid=0.95)])
    assert "gmoe-train" not in complete
    # a shortened search (suite_search's 30 epochs): the command runs the protocol's 100
    short = [result("gin", 8, [0.6], valid=0.91), result("gin", 4, [0.7], valid=0.95)]
    for r in short:
        r.config["trainer"]["epochs"] = 30
    shortened = selection(short)
    assert ("; the search ran 30 epochs, so to run it at the paper's protocol (10 seeds × 100 "
            "epochs):") in shortened
    assert ("`gmoe-train +experiment=paper_selected model.backbone=gin moe.num_experts=4 "
            "moe.num_hop2=2 moe.top_k=2`") in shortened  # paper_selected's own 100 epochs
    assert ("(validation 95.00 ± 0.00, 10 seeds; lead over gin +4.00 on validation, no interval (a "
            "single seed, or no spread)), already run with the paper's 10 seeds") in complete


def test_plain_rows_are_named_by_backbone_only(tmp_path: Path) -> None:
    plain = {"num_experts": 0, "num_hop2": 0, "top_k": 1, "loss_weight": 0.0}
    write_summary(tmp_path / "gcn", "gcn", plain, valid=0.8)
    write_summary(tmp_path / "gin", "gin", plain, valid=0.8)
    write_summary(tmp_path / "gmoe", "gcn", {"num_experts": 8, "num_hop2": 8, "top_k": 4,
                                             "loss_weight": 1.0}, valid=0.8)
    labels = sorted(r.label for r in collect([tmp_path]))
    assert labels == ["gcn width=300", "gcn λ=1 n=8 hop2=8 k=4 width=150", "gin width=300"]

def write_summary(folder: Path, backbone: str, moe: dict, valid: float,
                  config: dict | None = None) -> None:
    """A one-seed summary.json; ``config``, when given, is the job's whole config."""
    config = config or {"model": {"backbone": backbone}, "moe": moe,
                        "dataset": {"name": "ogbg-molbbbp"}}
    summary = {"dataset": "ogbg-molbbbp", "model": backbone, "metric": "rocauc", "config": config,
               "provenance": {}, "seeds": [seed_record(0, valid, 0.7)]}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_gmoe_select_prints_overrides_that_reproduce_the_chosen_job(
        tmp_path: Path, small_mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The printed command composes the chosen job's own config, keys the search's sweep or the user
    changed beyond n, m, k and λ included: the same config identity, so the same checkpoints."""
    search = tmp_path / "search"
    jobs = {  # folder: (overrides of the search job, mean validation)
        "0": (("model=gcn", "experts=n8_half", "moe.top_k=4", "moe.loss_weight=1.0"), 0.94),
        # the best: a sweep's int λ, a narrower network without the √k scaling, node dropping
        "1": (("model=gcn", "experts=n8_hop2", "moe.top_k=2", "moe.loss_weight=1",
               "model.hidden_dim=150", "moe.scale_hidden=false", "dataset.drop_node_p=0.2"), 0.95),
        "2": (("model=gin", "experts=n4_hop1", "moe.top_k=1", "moe.loss_weight=0.1"), 0.99),
    }
    configs = {}
    for folder, (overrides, valid) in jobs.items():
        composed = compose_cfg(tmp_path, small_mirror, "+experiment=paper_molbbbp", *overrides)
        configs[folder] = OmegaConf.to_container(composed, resolve=True)
        write_summary(search / folder, configs[folder]["model"]["backbone"], {}, valid,
                      config=configs[folder])
    assert select_main([str(search), "--backbone", "gcn"]) == 0
    overrides = shlex.split(capsys.readouterr().out)
    # n=8 and λ=1 are paper_selected's own values (moe=gmoe): nothing to override
    assert overrides == ["dataset.drop_node_p=0.2", "model.hidden_dim=150", "moe.num_hop2=8",
                         "moe.top_k=2", "moe.scale_hidden=false"]
    selected = OmegaConf.to_container(
        compose_cfg(tmp_path, small_mirror, "+experiment=paper_selected", *overrides), resolve=True)
    assert len(selected["seeds"]) == 10
    assert config_identity(selected) == config_identity(configs["1"])
    # the 10-seed run finds the search's finished seeds: the same checkpoint folder
    directories = [checkpoint_directory(validate(c), "ogbg-molbbbp", "f")
                   for c in (selected, configs["1"], configs["0"])]
    assert directories[0] == directories[1] != directories[2]

    # one GIN configuration is no choice: an error, and nothing on stdout for the make target to use
    assert select_main([str(search), "--backbone", "gin"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "nothing to choose from" in captured.err


def test_gmoe_select_keeps_the_evaluation_batch_expert_choice_was_searched_with(
        tmp_path: Path, small_mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Expert choice's capacity follows the batch, in evaluation too: the chosen job's evaluation
    batch is part of its model, so the printed command keeps it."""
    search = tmp_path / "search"
    configs = {}
    for batch, valid in ((64, 0.95), (256, 0.90)):
        composed = compose_cfg(tmp_path, small_mirror, "+experiment=paper_molbbbp", "model=gcn",
                               "moe.gate=expert_choice", f"trainer.eval_batch_size={batch}")
        configs[batch] = OmegaConf.to_container(composed, resolve=True)
        write_summary(search / str(batch), "gcn", {}, valid, config=configs[batch])
    assert select_main([str(search), "--backbone", "gcn"]) == 0
    overrides = shlex.split(capsys.readouterr().out)
    assert "trainer.eval_batch_size=64" in overrides
    selected = OmegaConf.to_container(
        compose_cfg(tmp_path, small_mirror, "+experiment=paper_selected", *overrides), resolve=True)
    assert config_identity(selected) == config_identity(configs[64]) != config_identity(configs[256])


@pytest.mark.parametrize("command", [report_main, routing_main, select_main])
def test_missing_folder_is_named(command, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_sweep"
    args = {report_main: ["--out", str(tmp_path / "r")], routing_main: ["--out", str(tmp_path / "r")],
            select_main: ["--backbone", "gcn"]}[command]
    assert command([str(missing), *args]) == 2
    assert f"{missing} does not exist." in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_suite_search_selects_lowest_rmse_and_reruns_at_the_paper_protocol(
        tmp_path: Path, small_mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """experiment=suite_search is the stated search (hop split × backbone, n=8, k=4, λ=1, 3 seeds ×
    30 epochs); on a regression dataset gmoe-select takes the lowest validation RMSE, and its
    overrides with trainer.epochs=100 (make reproduce-suite) compose that model at the protocol."""
    search_cfg = compose_cfg(tmp_path, small_mirror, "+experiment=suite_search",
                             "dataset=ogbg-molfreesolv")
    assert search_cfg.trainer.epochs == 30 and list(search_cfg.seeds) == [0, 1, 2]
    assert (search_cfg.moe.num_experts, search_cfg.moe.top_k, search_cfg.moe.loss_weight) == (8, 4, 1)
    grid = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / "suite_search.yaml").hydra.sweeper.params
    assert grid["model"] == "gcn,gin" and grid["experts"] == "n8_hop1,n8_half,n8_hop2"

    search = tmp_path / "search"
    for experts, rmse in (("n8_hop1", 2.0), ("n8_half", 1.8), ("n8_hop2", 1.5)):
        config = OmegaConf.to_container(compose_cfg(
            tmp_path, small_mirror, "+experiment=suite_search", "dataset=ogbg-molfreesolv",
            f"experts={experts}"), resolve=True)
        summary = {"dataset": "ogbg-molfreesolv", "model": "gcn", "metric": "rmse",
                   "config": config, "provenance": {},
                   "seeds": [seed_record(0, rmse, rmse)]}
        (search / experts).mkdir(parents=True)
        (search / experts / "summary.json").write_text(json.dumps(summary))
    assert select_main([str(search), "--backbone", "gcn"]) == 0
    overrides = shlex.split(capsys.readouterr().out)
    assert "moe.num_hop2=8" in overrides and "trainer.epochs=30" in overrides
    selected = compose_cfg(tmp_path, small_mirror, "+experiment=paper_selected", *overrides,
                           "trainer.epochs=100")
    assert selected.dataset.name == "ogbg-molfreesolv" and selected.moe.num_hop2 == 8
    assert selected.trainer.epochs == 100 and len(selected.seeds) == 10


def test_gmoe_select_refuses_an_unknown_backbone(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        select_main([str(tmp_path), "--backbone", "GCN"])
    assert exit_info.value.code == 2
    assert "argument --backbone: invalid choice: 'GCN' (choose from" in capsys.readouterr().err


def test_gmoe_select_says_how_far_its_choice_leads_and_warns_of_an_unfinished_search(
        tmp_path: Path, small_mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On stderr (stdout stays the overrides): the candidates best first, the chosen one's lead over
    the runner-up with Welch's interval and its verdict, and a warning when seed counts differ."""
    def search(name: str, metric: str, valids: dict[str, list[float]]) -> Path:
        folder = tmp_path / name
        for experts, values in valids.items():
            config = OmegaConf.to_container(compose_cfg(
                tmp_path, small_mirror, "+experiment=suite_search", f"experts={experts}"),
                resolve=True)
            summary = {"dataset": "ogbg-molbbbp", "model": "gcn", "metric": metric,
                       "config": config, "provenance": {},
                       "seeds": [seed_record(s, v, v) for s, v in enumerate(values)]}
            (folder / experts).mkdir(parents=True)
            (folder / experts / "summary.json").write_text(json.dumps(summary))
        return folder

    def select(folder: Path) -> list[str]:
        assert select_main([str(folder), "--backbone", "gcn"]) == 0
        captured = capsys.readouterr()
        assert captured.out.endswith("trainer.epochs=30\n") and "gmoe-select" not in captured.out
        return captured.err.splitlines()

    clear = select(search("clear", "rocauc", {"n8_hop1": [0.80, 0.81, 0.82],
                                              "n8_half": [0.90, 0.91, 0.92],
                                              "n8_hop2": [0.70, 0.72, 0.74]}))
    assert clear[0] == ("gmoe-select: ogbg-molbbbp GMoE-GCN, mean validation rocauc × 100 ± std "
                        "over seeds, the chosen first:")
    assert [line.split()[0] for line in clear[1:4]] == ["91.00", "81.00", "72.00"]
    assert "hop2=4" in clear[1] and "3 seeds" in clear[1]
    assert clear[4].startswith("gmoe-select: lead over ") and "+10.00 on validation" in clear[4]
    assert clear[4].endswith("beyond noise.")
    # seed counts agree: no warning; suite_search's 30 epochs: the note that keeps the protocol
    assert clear[5:] == ["gmoe-select: note: the search ran 30 epochs and these overrides keep them; "
                         "add trainer.epochs=100 after them for the paper's protocol (make "
                         "reproduce-suite does)."]

    close = select(search("close", "rocauc", {"n8_hop1": [0.90, 0.92, 0.94],
                                              "n8_half": [0.89, 0.93, 0.91]}))
    assert "+1.00 on validation" in close[3] and "within noise" in close[3]

    # an unfinished search: the one-seed candidate ranks second, and no interval can be drawn
    unfinished = select(search("unfinished", "rocauc", {"n8_hop1": [0.80, 0.81, 0.82],
                                                        "n8_half": [0.90, 0.91, 0.92],
                                                        "n8_hop2": [0.85]}))
    assert "1 seed " in unfinished[2] + " " and "no interval" in unfinished[4]
    assert unfinished[5] == ("gmoe-select: warning: the candidates have 1 to 3 finished seeds: the "
                             "search is unfinished (re-running its command resumes it), so the "
                             "choice may change.")

    # RMSE: the lowest wins, and its lead is counted positive
    rmse = select(search("rmse", "rmse", {"n8_hop1": [1.5, 1.6, 1.7], "n8_half": [1.0, 1.1, 1.2]}))
    assert "mean validation rmse ± std" in rmse[0]
    assert rmse[1].split()[0] == "1.10" and "+0.50 on validation" in rmse[3]
