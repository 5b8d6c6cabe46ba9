"""Mixture-of-Experts: routing (`select_experts`) and the expert layer (`FusedMoE`), stacked weights per layer.

Routing follows the config of each family:
- Mixtral: softmax over the experts, top-k, renormalised over the k chosen.
- Qwen2-MoE / Qwen3-MoE: softmax, top-k, renormalised only when `norm_topk_prob`; Qwen2-MoE adds a shared
  expert gated by sigmoid(shared_expert_gate(x)) (see `SparseMoeBlock` in `models/llama.py`).
- DeepSeek-V2/V3 style: softmax or sigmoid scores, grouped top-k (the best `topk_group` of `n_group` expert
  groups, a group scored by its best expert or, with a score-correction bias, by its two best), a correction
  bias that steers the choice but not the weights, renormalisation and a routed scaling factor.

The experts of one layer are two stacked parameters, `w13_weight` [E, 2I, H] (gate | up) and `w2_weight`
[E, H, I]; the expert computation is the platform's `ops.fused_moe` (a per-expert torch loop by default, a
Triton grouped GEMM on CUDA/ROCm). Tensor parallelism shards I (w13 by rows, w2 by columns, the output
all-reduced). Expert parallelism later gives each rank the experts `expert_start:expert_start + local`;
`FusedMoE` already keeps the global -> local expert map for it (world size 1: every expert is local).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pageport.models.layers import _all_reduce, _divide, _param, get_tensor_parallel
from pageport.platforms.ops import Ops


def select_experts(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
                   renormalize: bool = True, num_expert_group: Optional[int] = None,
                   topk_group: Optional[int] = None, correction_bias: Optional[torch.Tensor] = None,
                   routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights float32 [T, k], topk_ids int64 [T, k])."""
    logits = router_logits.float()
    if scoring == "softmax":
        scores = logits.softmax(dim=-1)
    elif scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown MoE scoring function {scoring!r} (softmax or sigmoid)")
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if num_expert_group and num_expert_group > 1:
        t, e = choice.shape
        groups = choice.view(t, num_expert_group, e // num_expert_group)
        if correction_bias is None:
            group_scores = groups.max(dim=-1).values
        else:
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(e // num_expert_group, dim=1), float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """The plainest definition (every token, every chosen expert, in float64): for tests."""
    xd, w13d, w2d = x.double(), w13.double(), w2.double()
    out = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w13d[e] @ xd[t]).chunk(2)
            out[t] += float(topk_weights[t, j]) * (w2d[e] @ (F.silu(gate) * up))
    return out


class FusedMoE(nn.Module):
    """The routed experts of one layer: forward(x [T, H], router_logits [T, E]) -> [T, H] (all-reduced)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, ops: Ops, *,
                 scoring: str = "softmax", renormalize: bool = True, num_expert_group: Optional[int] = None,
                 topk_group: Optional[int] = None, routed_scaling_factor: float = 1.0,
                 correction_bias: bool = False, activation: str = "silu"):
        super().__init__()
        if activation != "silu":
            raise ValueError(f"unsupported MoE activation {activation!r} (only silu)")
        self.tp_rank, self.tp_size = get_tensor_parallel()
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden_size
        self.intermediate_size = _divide(intermediate_size, self.tp_size, "MoE intermediate size")
        # expert parallelism: the experts this rank holds (all of them for now)
        self.expert_start, self.num_local_experts = 0, num_experts
        self.routing = dict(scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
                            topk_group=topk_group, routed_scaling_factor=routed_scaling_factor)
        self.ops = ops
        e, i = self.num_local_experts, self.intermediate_size
        self.w13_weight = _param(e, 2 * i, hidden_size, loader=self.weight_loader)
        self.w2_weight = _param(e, hidden_size, i, loader=self.weight_loader)
        # shard ids a complete checkpoint fills (None: the whole stacked tensor at once)
        self.w13_weight.required_shards = {(x, j) for x in range(num_experts) for j in (0, 1)}
        self.w2_weight.required_shards = {(x, 2) for x in range(num_experts)}
        self.e_score_correction_bias = _param(num_experts, fill=0.0) if correction_bias else None

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard_id=None) -> None:
        """shard_id: (expert, 0 | 1 | 2) for one expert's gate / up / down weight as a checkpoint stores it
        ([I, H], [I, H], [H, I]); None for the stacked tensor of all experts (gate|up [E, 2I, H] or down
        [E, H, I], transformers' in-memory layout)."""
        i, r = self.intermediate_size, self.tp_rank
        if shard_id is None:
            if param is self.w13_weight:
                gate, up = w.chunk(2, dim=1)
                w = torch.cat([gate.narrow(1, r * i, i), up.narrow(1, r * i, i)], dim=1)
            else:
                w = w.narrow(2, r * i, i)
            w = w.narrow(0, self.expert_start, self.num_local_experts)
            if tuple(w.shape) != tuple(param.shape):
                raise ValueError(f"stacked expert weight {tuple(w.shape)} does not fit {tuple(param.shape)}")
            param.data.copy_(w)
            return
        expert, which = shard_id
        local = expert - self.expert_start
        if not 0 <= local < self.num_local_experts:
            return  # another rank's expert
        if which in (0, 1):
            dst = param.data[local].narrow(0, which * i, i)
            w = w.narrow(0, r * i, i)
        else:
            dst = param.data[local]
            w = w.narrow(1, r * i, i)
        if tuple(w.shape) != tuple(dst.shape):
            raise ValueError(f"expert weight {tuple(w.shape)} does not fit {tuple(dst.shape)}")
        dst.copy_(w)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        bias = self.e_score_correction_bias
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, correction_bias=bias, **self.routing)
        out = self.ops.fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return _all_reduce(out)
