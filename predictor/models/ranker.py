"""Ranking model: scores a few hundred (user, candidate) pairs with DIN-style target attention.

It reads the frozen retrieval embeddings (user vector, history item vectors, candidate vectors), the
retrieval score, user and item dense features and the user's affinity for the candidate's categories,
plus a small id embedding of its own for what retrieval missed. Trained listwise: softmax over the
positive and ``ranker_negatives`` hard negatives taken from the retrieval top candidates.

Shapes: B users, K candidates each, L history, D retrieval width, F_u / F_i dense widths, C categories.
"""

from __future__ import annotations

import torch
from torch import nn

from predictor.models.config import ModelConfig
from predictor.models.two_tower import IdEmbedding


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
        """history ``[B, L, D]``, mask ``[B, L]`` (True = real item), candidates ``[B, K, D]`` → ``[B, K, D]``."""
        B, L, D = history.shape
        K = candidates.shape[1]
        weight = self.product.weight
        weight = weight().dequantize() if callable(weight) else weight  # int8 ranker: a quantised Linear
        hidden = weight.shape[0]
        # P (h ⊙ c) = Σ_d P[:, d] h_d c_d: scale the history by each column of P ([B, L·H, D]), then one
        # batched product with the candidates ([B, D, K]), never the [B, K, L, D] outer product
        scaled = (history[:, :, None, :] * weight[None, None, :, :]).reshape(B, L * hidden, D)
        product = torch.bmm(scaled, candidates.transpose(1, 2)).reshape(B, L, hidden, K).permute(0, 3, 1, 2)
        pre = (
            self.history(history)[:, None, :, :]  # [B, 1, L, H]
            + self.candidate(candidates)[:, :, None, :]  # [B, K, 1, H]
            + product  # [B, K, L, H]
        )
        w = self.out(pre).squeeze(-1)  # [B, K, L]
        w = w.masked_fill(~mask[:, None, :], float("-inf"))
        w = torch.softmax(w, dim=-1).nan_to_num(0.0)  # users without history attend to nothing
        return torch.einsum("bkl,bld->bkd", w, history)


class Ranker(nn.Module):
    def __init__(self, config: ModelConfig, n_item_rows: int, n_categories: int, user_dense_dim: int,
                 item_dense_dim: int):  # fmt: skip
        super().__init__()
        d = config.dim
        self.config = config
        self.attention = TargetAttention(d)
        self.item_id = IdEmbedding(n_item_rows, d, config.embedding_fp16)
        width = 4 * d + user_dense_dim + item_dense_dim + 2
        layers: list[nn.Module] = []
        for hidden in config.ranker_hidden:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(config.dropout)]
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
        B, K, _ = candidates.shape
        retrieval = (user[:, None, :] * candidates).sum(-1)  # [B, K]
        interest = self.attention(history, history_mask, candidates)
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
