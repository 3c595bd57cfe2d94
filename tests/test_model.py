from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Batch
from torch_geometric.utils import degree

from gmoe_bench.config import Gate, ModelConfig, MoEConfig, expert_hidden_dim
from gmoe_bench.data.hop2 import two_hop_edges
from gmoe_bench.model import build_model
from gmoe_bench.model.conv import OGBGCNConv, OGBGINConv
from gmoe_bench.model.gate import NoisyTopKGate, build_gate, cv_squared
from gmoe_bench.model.moe import GMoELayer, HopGraph
from tests.test_hop2 import graph

GATES = [gate.value for gate in Gate]
SMILES = ["CCO", "c1ccccc1CN", "C1CCNCC1C(=O)O", "C", "CC(C)(C)Cl", "[Na+].[Cl-]", "C1CCC1"]


def batch() -> Batch:
    return Batch.from_data_list([graph(s) for s in SMILES])


def hops(b: Batch) -> tuple[HopGraph, HopGraph]:
    n = b.num_nodes
    hop1 = HopGraph(b.edge_index, b.edge_attr, degree(b.edge_index[0], n) + 1)
    index2, attr2 = two_hop_edges(b.edge_index, b.edge_attr, n)
    return hop1, HopGraph(index2, attr2, degree(index2[0], n) + 1)


def moe_cfg(n: int, m: int, k: int, dispatch: str = "sparse", combine: str = "sum",
            gate: str = "top_k") -> MoEConfig:
    return MoEConfig(num_experts=n, num_hop2=m, top_k=k, loss_weight=1.0, noisy_gating=True,
                     combine=combine, dispatch=dispatch, scale_hidden=True, gate=gate)


def model_cfg(backbone: str = "gcn", hidden: int = 32, virtual_node: bool = False) -> ModelConfig:
    return ModelConfig(backbone=backbone, num_layers=3, hidden_dim=hidden, dropout=0.5,
                       virtual_node=virtual_node, pooling="mean")


def test_gcn_conv_matches_ogb_formula() -> None:
    torch.manual_seed(0)
    b = batch()
    hop1, _ = hops(b)
    conv = OGBGCNConv(16)
    x = torch.randn(b.num_nodes, 16)
    out = conv(x, hop1.edge_index, hop1.edge_attr, hop1.deg, b.num_nodes)
    h = conv.linear(x)
    bonds = conv.bond_encoder(b.edge_attr)
    deg = hop1.deg
    expected = F.relu(h + conv.root_emb.weight) / deg[:, None]
    for e, (j, i) in enumerate(b.edge_index.T.tolist()):
        expected[i] += F.relu(h[j] + bonds[e]) / (deg[i] * deg[j]).sqrt()
    torch.testing.assert_close(out, expected)


def test_gin_conv_matches_ogb_formula() -> None:
    torch.manual_seed(0)
    b = batch()
    hop1, _ = hops(b)
    conv = OGBGINConv(16).eval()
    with torch.no_grad():
        conv.eps.fill_(0.3)
    x = torch.randn(b.num_nodes, 16)
    out = conv(x, hop1.edge_index, hop1.edge_attr, hop1.deg, b.num_nodes)
    bonds = conv.bond_encoder(b.edge_attr)
    agg = torch.zeros_like(x)
    for e, (j, i) in enumerate(b.edge_index.T.tolist()):
        agg[i] += F.relu(x[j] + bonds[e])
    torch.testing.assert_close(out, conv.mlp(1.3 * x + agg))


@pytest.mark.parametrize("backbone", ["gcn", "gin"])
@pytest.mark.parametrize("hop", [1, 2])
def test_experts_on_routed_nodes_equal_full_passes(backbone: str, hop: int) -> None:
    """Under dispatch each expert computes only its nodes, with the values of a full pass."""
    torch.manual_seed(0)
    b = batch()
    hop1, hop2 = hops(b)
    layer, x, expert = routed_layer(backbone, hop, b.num_nodes)
    layer.eval()
    out, stats = layer(x, hop1, hop2)
    assert stats.expert_counts.tolist() == torch.bincount(expert, minlength=3).tolist()
    g = hop1 if hop == 1 else hop2
    for e in range(3):
        full = layer.norms[e](layer.convs[e](x, g.edge_index, g.edge_attr, g.deg, b.num_nodes))
        torch.testing.assert_close(out[expert == e], full[expert == e])


def routed_layer(backbone: str, hop: int, num_nodes: int) -> tuple[GMoELayer, Tensor, Tensor]:
    """A 3-expert, k=1 layer and features whose gate sends node i to expert[i] (uneven groups)."""
    layer = GMoELayer(backbone, 16, 3, 3 if hop == 2 else 0, 1, False, "sum", "sparse")
    x = torch.randn(num_nodes, 16)
    expert = torch.arange(num_nodes) % 3
    expert[:4] = 1
    with torch.no_grad():  # route node i to expert[i] through the gate: logits = one-hot
        layer.gate.w_gate.zero_()
        x[:, :3] = 0.0
        x[torch.arange(num_nodes), expert] = 5.0
        layer.gate.w_gate[:3, :3] = torch.eye(3)
    return layer, x, expert


@pytest.mark.parametrize("backbone", ["gcn", "gin"])
@pytest.mark.parametrize("hop", [1, 2])
def test_grouped_experts_equal_each_expert_alone_in_training(backbone: str, hop: int) -> None:
    """All experts run as one grouped computation give, in training, what each expert computes
    alone on its routed nodes (BatchNorm over those nodes): outputs, gradients, running stats."""
    torch.manual_seed(0)
    b = batch()
    layer, x, expert = routed_layer(backbone, hop, b.num_nodes)
    references = copy.deepcopy(layer)
    layer.train()
    references.train()
    x.requires_grad_()
    out, _ = layer(x, *hops(b))
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    g = hops(b)[hop - 1]
    x_ref = x.detach().clone().requires_grad_()
    for e in range(3):
        mask = expert == e
        conv, norm = references.convs[e], references.norms[e]
        if backbone == "gin":  # the MLP, with its BatchNorm, sees the routed nodes only
            conv.mlp[0].register_forward_pre_hook(lambda _, args, mask=mask: (args[0][mask],))
            y = norm(conv(x_ref, g.edge_index, g.edge_attr, g.deg, b.num_nodes))
        else:
            y = norm(conv(x_ref, g.edge_index, g.edge_attr, g.deg, b.num_nodes)[mask])
        torch.testing.assert_close(out[mask], y)
        (y * weights[mask]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), ref in zip(layer.named_parameters(), references.parameters(), strict=True):
        if not name.startswith("gate"):
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")
    for (name, buffer), ref in zip(layer.named_buffers(), references.buffers(), strict=True):
        torch.testing.assert_close(buffer, ref, msg=lambda m, name=name: f"{name}: {m}")


def test_gate_is_sparse_normalised_and_noise_free_in_eval() -> None:
    torch.manual_seed(0)
    gate = NoisyTopKGate(16, num_experts=6, top_k=2, noisy=True)
    torch.nn.init.normal_(gate.w_gate)
    torch.nn.init.normal_(gate.w_noise)
    x = torch.randn(50, 16)
    gate.train()
    gates = gate(x).dense_gates(50, 6)
    assert ((gates > 0).sum(1) == 2).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(50))
    assert not torch.equal(gate(x).weight, gate(x).weight)  # noisy in training
    gate.eval()
    first, second = gate(x), gate(x)
    assert torch.equal(first.weight, second.weight)
    assert torch.equal(first.expert.view(50, 2), (x @ gate.w_gate).topk(2, dim=1).indices)
    torch.testing.assert_close(first.load, torch.bincount(first.expert, minlength=6).float())


@pytest.mark.parametrize("kind", GATES)
def test_every_gate_is_sparse_as_stated_normalised_and_noise_free_in_eval(kind: str) -> None:
    torch.manual_seed(0)
    num_nodes, n, k = 50, 6, 2
    gate = build_gate(kind, 16, num_experts=n, top_k=k, noisy=True)
    for weight in (getattr(gate, "w_gate", None), getattr(gate, "w_noise", None)):
        if weight is not None:
            torch.nn.init.normal_(weight)
    x = torch.randn(num_nodes, 16)
    gate.train()
    routing = gate(x)
    assert torch.equal(routing.node, routing.node.sort().values)  # node-major, as dispatch needs
    gates = routing.dense_gates(num_nodes, n)
    per_node, per_expert = (gates > 0).sum(1), torch.bincount(routing.expert, minlength=n)
    if kind == "expert_choice":  # every expert takes ⌈kN/n⌉ nodes; a node gets 0..n experts
        assert (per_expert == math.ceil(k * num_nodes / n)).all()
        assert per_node.min() < k < per_node.max()
    else:
        assert (per_node == (n if kind == "dense" else k)).all()
        torch.testing.assert_close(gates.sum(1), torch.ones(num_nodes))
    torch.testing.assert_close(routing.importance, gates.sum(0))
    if kind == "random":
        assert (routing.weight == 1 / k).all()
        assert torch.equal(gate(x).expert, routing.expert)  # frozen: no noise in training either
    else:
        assert not torch.equal(gate(x).weight, routing.weight)  # noisy in training
    gate.eval()
    first, second = gate(x), gate(x)
    assert torch.equal(first.expert, second.expert) and torch.equal(first.weight, second.weight)
    if kind in ("dense", "expert_choice"):  # the weights are softmax probabilities of clean logits
        probs = torch.softmax(x @ gate.w_gate, dim=1)
        torch.testing.assert_close(first.weight, probs[first.node, first.expert])


def test_cv_squared() -> None:
    assert cv_squared(torch.full((5,), 3.0)).item() == pytest.approx(0.0)
    assert cv_squared(torch.tensor([7.0])).item() == 0.0
    uneven = torch.tensor([1.0, 2.0, 9.0])
    assert cv_squared(uneven).item() > 0.5
    assert cv_squared(10 * uneven).item() == pytest.approx(cv_squared(uneven).item(), rel=1e-5)
    assert cv_squared(torch.tensor([0.0, 0.0, 4.0])) > cv_squared(torch.tensor([1.0, 1.0, 2.0]))
    # the unbiased variance, as the official code: [1, 2, 9] has mean 4 and variance 38/2 = 19
    assert cv_squared(uneven).item() == pytest.approx(19 / 16)
    torch.testing.assert_close(cv_squared(torch.tensor([[1.0, 3.0], [2.0, 2.0]])),
                               torch.tensor([0.5, 0.0]))


def test_load_estimator_trains_both_gate_weights() -> None:
    torch.manual_seed(0)
    gate = NoisyTopKGate(16, num_experts=4, top_k=1, noisy=True).train()
    torch.nn.init.normal_(gate.w_gate, std=0.1)
    torch.nn.init.normal_(gate.w_noise, std=0.1)
    routing = gate(torch.randn(64, 16))
    assert routing.load.requires_grad
    cv_squared(routing.load).backward()
    assert gate.w_gate.grad.abs().sum() > 0
    assert gate.w_noise.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smooth_load_counts_k_experts_per_node(k: int) -> None:
    """Shazeer's load is each node's probability of being in each expert's top k: summed over
    experts it is about k per node, where the importance (softmaxed weights) is exactly 1."""
    torch.manual_seed(0)
    gate = NoisyTopKGate(16, num_experts=4, top_k=k, noisy=True).train()
    torch.nn.init.normal_(gate.w_gate, std=0.1)
    torch.nn.init.normal_(gate.w_noise, std=0.1)
    routing = gate(torch.randn(2000, 16))
    assert routing.importance.sum().item() / 2000 == pytest.approx(1.0, abs=1e-5)
    assert routing.load.sum().item() / 2000 == pytest.approx(k, abs=0.05)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("backbone", ["gcn", "gin"])
@pytest.mark.parametrize(("n", "m", "k"), [(4, 0, 1), (4, 2, 2), (4, 4, 4), (6, 3, 2), (1, 1, 1)])
def test_dispatch_equals_dense_reference_in_eval(backbone: str, n: int, m: int, k: int,
                                                 gate: str) -> None:
    """Grouped experts over the gate's (node, expert) pairs, any number per node (expert choice
    gives some nodes none, others several), equal every expert on every node weighted by the gate."""
    torch.manual_seed(0)
    b = batch()
    sparse = build_model(model_cfg(backbone), moe_cfg(n, m, k, "sparse", gate=gate), num_tasks=1)
    for module in sparse.modules():  # non-trivial routing and BatchNorm statistics
        if isinstance(module, NoisyTopKGate):
            torch.nn.init.normal_(module.w_gate)
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    dense = copy.deepcopy(sparse)
    for layer in dense.layers:
        layer.dispatch = "dense"
    outputs = []
    for model in (sparse, dense):
        model.eval()
        out = model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
        (out.logits.sum() + out.aux_loss).backward()
        outputs.append((out, {name: p.grad for name, p in model.named_parameters()}))
    (out_s, grad_s), (out_d, grad_d) = outputs
    torch.testing.assert_close(out_s.logits, out_d.logits)
    torch.testing.assert_close(out_s.aux_loss, out_d.aux_loss)
    assert torch.equal(out_s.expert_counts, out_d.expert_counts)
    for name, grad in grad_s.items():
        # an expert no node chose has no gradient under dispatch and a zero one in the reference
        zero = torch.zeros_like(next(g for g in (grad, grad_d[name], torch.zeros(1))
                                     if g is not None))
        torch.testing.assert_close(zero if grad is None else grad,
                                   zero if grad_d[name] is None else grad_d[name], msg=name)


@pytest.mark.parametrize(("backbone", "dispatch", "combine", "virtual"),
                         list(itertools.product(["gcn", "gin"], ["sparse", "dense"],
                                                ["sum", "mean"], [False, True])))
def test_training_step_runs_for_edge_cases(backbone: str, dispatch: str, combine: str,
                                           virtual: bool) -> None:
    torch.manual_seed(0)
    b = batch()
    for n, m, k in [(1, 0, 1), (3, 3, 3), (4, 0, 4), (8, 4, 1)]:
        model = build_model(model_cfg(backbone, virtual_node=virtual),
                            moe_cfg(n, m, k, dispatch, combine), 1).train()
        out = model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
        assert out.logits.shape == (len(SMILES), 1)
        assert out.expert_counts.shape == (3, n)
        assert (out.expert_counts.sum(1) == k * b.num_nodes).all()
        (out.logits.sum() + out.aux_loss).backward()
        assert torch.isfinite(out.logits).all()


def test_expert_given_one_node_in_training_uses_running_statistics() -> None:
    torch.manual_seed(0)
    b = batch()
    layer = GMoELayer("gin", 16, 2, 0, 1, False, "sum", "sparse").train()
    x = torch.randn(b.num_nodes, 16)
    with torch.no_grad():  # route node 0 alone to expert 1
        layer.gate.w_gate.zero_()
        layer.gate.w_gate[0, 1] = 100.0
        x[:, 0] = -1.0
        x[0, 0] = 1.0
    before = copy.deepcopy(layer)
    out, stats = layer(x, *hops(b))
    assert stats.expert_counts.tolist() == [b.num_nodes - 1, 1]
    assert torch.isfinite(out).all()
    assert layer.training and layer.convs[1].training
    lone = before.eval()  # expert 1 normalised its node with, and kept, its running statistics
    g = hops(b)[0]
    alone = lone.norms[1](lone.convs[1](x, g.edge_index, g.edge_attr, g.deg, b.num_nodes))
    torch.testing.assert_close(out[0], alone[0])
    for name, buffer in layer.named_buffers():
        kept = dict(before.named_buffers())[name]
        assert torch.equal(buffer, kept) == name.startswith(("convs.1.", "norms.1.")), name


@pytest.mark.parametrize(("backbone", "gate"), list(itertools.product(["gcn", "gin"], GATES)))
def test_a_layer_given_no_atoms_returns_no_rows(backbone: str, gate: str) -> None:
    no_edges = torch.empty(2, 0, dtype=torch.long)
    bonds, paths = (HopGraph(no_edges, torch.empty(0, columns, dtype=torch.long), torch.empty(0))
                    for columns in (3, 6))  # a bond's features, a 2-hop path's
    for dispatch, training in itertools.product(["sparse", "dense"], [True, False]):
        layer = GMoELayer(backbone, 8, 4, 2, 2, True, "sum", dispatch, gate).train(training)
        out, stats = layer(torch.empty(0, 8), bonds, paths)
        assert out.shape == (0, 8), (dispatch, training)
        assert stats.expert_counts.tolist() == [0, 0, 0, 0]


def test_hidden_size_scales_with_top_k() -> None:
    model = ModelConfig(backbone="gcn", num_layers=5, hidden_dim=300, dropout=0.5,
                        virtual_node=False, pooling="mean")
    assert expert_hidden_dim(model, moe_cfg(8, 4, 4)) == 150
    assert expert_hidden_dim(model, moe_cfg(8, 4, 1)) == 300
    assert expert_hidden_dim(model, moe_cfg(0, 0, 1)) == 300
    no_scaling = moe_cfg(8, 4, 4)
    no_scaling.scale_hidden = False
    assert expert_hidden_dim(model, no_scaling) == 300


@pytest.mark.parametrize("pooling", ["mean", "sum", "max"])
def test_pooling_reads_out_each_graph(pooling: str) -> None:
    """The head sees, per graph, the mean / sum / max of the last layer's atom embeddings."""
    torch.manual_seed(0)
    b = batch()
    plain = MoEConfig(num_experts=0, num_hop2=0, top_k=1, loss_weight=0.0, noisy_gating=False,
                      combine="sum", dispatch="sparse", scale_hidden=False, gate="top_k")
    config = ModelConfig(backbone="gin", num_layers=3, hidden_dim=16, dropout=0.5,
                         virtual_node=False, pooling=pooling)
    model = build_model(config, plain, num_tasks=2).eval()  # eval: no dropout after the last layer
    seen: dict[str, torch.Tensor] = {}
    model.layers[-1].register_forward_hook(lambda _m, _i, out: seen.update(atoms=out[0]))
    model.head.register_forward_hook(lambda _m, inputs, _o: seen.update(pooled=inputs[0]))
    model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
    reduce = {"mean": lambda h: h.mean(0), "sum": lambda h: h.sum(0),
              "max": lambda h: h.max(0).values}[pooling]
    expected = torch.stack([reduce(seen["atoms"][b.batch == g]) for g in range(b.num_graphs)])
    torch.testing.assert_close(seen["pooled"], expected)


@pytest.mark.parametrize("backbone", ["gcn", "gin"])
def test_grouped_batch_norm_is_stable_for_a_lopsided_split(backbone: str) -> None:
    """Three nodes on one expert, the rest on another, features far from zero: each expert's
    BatchNorm statistics over its own rows, finite, as nn.BatchNorm1d computes them."""
    torch.manual_seed(0)
    b = Batch.from_data_list([graph(s) for s in SMILES * 20])
    layer, x, _ = routed_layer(backbone, 1, b.num_nodes)
    expert = torch.full((b.num_nodes,), 2)
    expert[:3] = 0
    with torch.no_grad():
        x[:, :3] = 0.0
        x[torch.arange(b.num_nodes), expert] = 5.0
        x[:, 3:] += 300.0
    layer.train()
    reference = copy.deepcopy(layer)
    out, _ = layer(x, *hops(b))
    assert torch.isfinite(out).all()
    if backbone == "gin":  # its MLP's own BatchNorm would need the routed subgraph: see above
        return
    for e, nodes in ((0, torch.arange(3)), (2, torch.arange(3, b.num_nodes))):
        g = hops(b)[0]
        conv, norm = reference.convs[e], reference.norms[e]
        full = norm(conv(x, g.edge_index, g.edge_attr, g.deg, b.num_nodes)[nodes])
        torch.testing.assert_close(out[nodes], full, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.norms[e].running_var, norm.running_var, rtol=1e-4,
                                   atol=1e-4)
