"""Models: OGB's GCN/GIN backbones and their GMoE versions."""

from __future__ import annotations

from torch import nn

from gmoe_bench.config import ModelConfig, MoEConfig, expert_hidden_dim
from gmoe_bench.model.gnn import BackboneLayer, ModelOutput, MolGNN
from gmoe_bench.model.moe import GMoELayer

__all__ = ["ModelOutput", "MolGNN", "build_model"]


def build_model(model: ModelConfig, moe: MoEConfig, num_tasks: int) -> MolGNN:
    """The network a config describes: plain backbone for ``moe.num_experts == 0``, else GMoE."""
    emb_dim = expert_hidden_dim(model, moe)
    layers: list[nn.Module]
    if moe.enabled:
        layers = [GMoELayer(model.backbone, emb_dim, moe.num_experts, moe.num_hop2, moe.top_k,
                            moe.noisy_gating, moe.combine, moe.dispatch, moe.gate)
                  for _ in range(model.num_layers)]
    else:
        layers = [BackboneLayer(model.backbone, emb_dim) for _ in range(model.num_layers)]
    return MolGNN(num_tasks, emb_dim, model.num_layers, model.dropout, model.virtual_node,
                  model.pooling, layers, moe.loss_weight if moe.enabled else 0.0)
