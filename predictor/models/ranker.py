"""Ranking model: scores a few hundred (user, candidate) pairs with DIN-style target attention.

It reads the frozen retrieval embeddings (user vector, history item vectors, candidate vectors), the
retrieval score, user and item dense features and the user's affinity for the candidate's categories,
plus a small id embedding of its own for what retrieval missed. Trained listwise: softmax over the
positive and ``ranker_negatives`` hard negatives taken from the retrieval top candidates.

Shapes: B users, K candidates each, L history, D retrieval width, F_u / F_i dense widths, C categories.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from predictor.models.config import ModelConfig
from predictor.models.two_tower import IdEmbedding, MaskDropout


class TargetAttention(nn.Module):
    """DIN attention unit: weights history items by their relation to the candidate.

    DIN scores ``MLP([h, c, h*c, h-c])``; the first layer is linear, so it is computed as
    ``A h + B c + P (h*c)`` without materialising the ``[B, K, L, 4D]`` concatenation, and the product
    term as one batched matrix product, without the ``[B, K, L, D]`` outer product either.
    """

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.history = nn.Linear(dim, hidden)
        self.candidate = nn.Linear(dim, hidden, bias=False)
        self.product = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, history: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """history ``[B, L, D]``, mask ``[B, L]`` (True: item), candidates ``[B, K, D]`` → ``[B, K, D]``."""
        B, L, D = history.shape
        K = candidates.shape[1]
        w_product, _ = _linear_params(self.product)
        w_history, b_history = _linear_params(self.history)
        w_candidate, _ = _linear_params(self.candidate)
        w_out, b_out = _linear_params(self.out[1])
        H = w_product.shape[0]
        # P (h ⊙ c) = Σ_d P[:, d] h_d c_d: the history scaled by each row of P ([B, L·H, D]) times the
        # candidates ([B, D, K]) in one batched product that also adds A h; laid out [B, L, H, K] so that
        # B c broadcasts and the output unit contracts H without copies
        scaled = (history[:, :, None, :] * w_product[None, None, :, :]).reshape(B, L * H, D)
        per_history = F.linear(history, w_history, b_history).reshape(B, L * H, 1).expand(B, L * H, K)
        pre = torch.baddbmm(per_history, scaled, candidates.transpose(1, 2)).view(B, L, H, K)
        pre += F.linear(candidates, w_candidate).transpose(1, 2)[:, None, :, :]
        w = (torch.matmul(w_out, F.gelu(pre)).squeeze(2) + b_out).transpose(1, 2)  # [B, K, L]
        w = w.masked_fill(~mask[:, None, :], float("-inf"))
        w = torch.softmax(w, dim=-1).nan_to_num(0.0)  # users without history attend to nothing
        return torch.bmm(w, history)


def _linear_params(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float weight and bias of a Linear, or of its dynamically quantised copy (the int8 ranker)."""
    weight, bias = layer.weight, layer.bias
    if callable(weight):
        weight, bias = weight().dequantize(), bias()
    return weight, bias


class Ranker(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        n_item_rows: int,
        n_categories: int,
        user_dense_dim: int,
        item_dense_dim: int,
    ):
        super().__init__()
        d = config.dim
        self.config = config
        self.attention = TargetAttention(d)
        self.item_id = IdEmbedding(n_item_rows, d, config.embedding_fp16)
        width = 4 * d + user_dense_dim + item_dense_dim + 2
        layers: list[nn.Module] = []
        for hidden in config.ranker_hidden:
            layers += [nn.Linear(width, hidden), nn.GELU(), MaskDropout(config.dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))
        # the retrieval score enters the output directly too, so the ranker starts as retrieval's order
        self.retrieval_weight = nn.Parameter(torch.tensor(1.0 / config.temperature))

    def forward(
        self,
        user: torch.Tensor,  # [B, D]
        history: torch.Tensor,  # [B, L, D]
        history_mask: torch.Tensor,  # [B, L] bool
        candidates: torch.Tensor,  # [B, K, D]
        candidate_index: torch.Tensor,  # [B, K] int64
        candidate_dense: torch.Tensor,  # [B, K, F_i]
        category_match: torch.Tensor,  # [B, K]: user's affinity for the candidate's categories
        user_dense: torch.Tensor,  # [B, F_u]
    ) -> torch.Tensor:
        """Scores ``[B, K]`` (higher is better)."""
        B, K, D = candidates.shape
        retrieval = (user[:, None, :] * candidates).sum(-1)  # [B, K]
        interest = self.attention(history, history_mask, candidates)
        first = self.mlp[0]
        if not isinstance(first, nn.Linear):  # the int8 ranker: its quantised layer takes the whole row
            features = torch.cat(
                [
                    candidates,
                    interest,
                    user[:, None, :].expand(B, K, -1),
                    self.item_id(candidate_index),
                    user_dense[:, None, :].expand(B, K, -1),
                    candidate_dense,
                    retrieval.unsqueeze(-1),
                    category_match.unsqueeze(-1),
                ],
                dim=-1,
            )
            return self.mlp(features).squeeze(-1) + self.retrieval_weight * retrieval
        # the first layer reads [candidate, interest, user, item id, user features, candidate features,
        # retrieval, match]; the user's columns are the same for all K candidates: once per user
        F_u = user_dense.shape[1]
        w = first.weight
        per_user = F.linear(user, w[:, 2 * D : 3 * D]) + F.linear(
            user_dense, w[:, 4 * D : 4 * D + F_u], first.bias
        )
        pair = torch.cat(
            [
                candidates,
                interest,
                self.item_id(candidate_index),
                candidate_dense,
                retrieval.unsqueeze(-1),
                category_match.unsqueeze(-1),
            ],
            dim=-1,
        )
        w_pair = torch.cat([w[:, : 2 * D], w[:, 3 * D : 4 * D], w[:, 4 * D + F_u :]], dim=1)
        hidden = F.linear(pair, w_pair) + per_user[:, None, :]
        return self.mlp[1:](hidden).squeeze(-1) + self.retrieval_weight * retrieval
