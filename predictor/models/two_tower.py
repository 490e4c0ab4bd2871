"""Two-tower retrieval: a user encoder over the recent-item sequence and user features, an item encoder
over item id and item features, L2-normalised embeddings, in-batch sampled softmax with logQ correction.

Shapes: B = batch, L = history length, D = ``config.dim``, F_u / F_i = dense feature widths,
C = categories, N = items (+1 for the padding row 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from predictor.models.config import ModelConfig


class IdEmbedding(nn.Module):
    """An id embedding table, optionally stored in float16; row 0 is padding (zeros)."""

    def __init__(self, rows: int, dim: int, fp16: bool = False):
        super().__init__()
        weight = torch.randn(rows, dim) * (dim**-0.5)
        weight[0] = 0
        self.weight = nn.Parameter(weight.half() if fp16 else weight)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.weight, padding_idx=0).float()

    @property
    def rows(self) -> int:
        return self.weight.shape[0]


class ItemEncoder(nn.Module):
    """Item id embedding + category embedding + dense item features → ``[*, D]`` (not normalised)."""

    def __init__(self, config: ModelConfig, n_item_rows: int, n_categories: int, item_dense_dim: int):
        super().__init__()
        self.id_embedding = IdEmbedding(n_item_rows, config.dim, config.embedding_fp16)
        self.category = nn.Linear(max(n_categories, 1), config.dim, bias=False)
        self.dense = nn.Linear(item_dense_dim, config.dim)
        self.mix = nn.Sequential(nn.Linear(3 * config.dim, config.dim), nn.GELU(), nn.Linear(config.dim, config.dim))
        self.n_categories = n_categories

    def forward(self, index: torch.Tensor, categories: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """index ``[*]`` int64, categories ``[*, C]``, dense ``[*, F_i]`` → ``[*, D]``."""
        e = self.id_embedding(index)
        c = self.category(categories) if self.n_categories else torch.zeros_like(e)
        return e + self.mix(torch.cat([e, c, self.dense(dense)], dim=-1))


class UserEncoder(nn.Module):
    """Self-attention over the newest-first history plus user features → ``[B, D]`` (not normalised)."""

    def __init__(self, config: ModelConfig, user_dense_dim: int):
        super().__init__()
        self.position = nn.Embedding(config.max_history, config.dim)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.encoder_heads, dim_feedforward=4 * config.dim, dropout=config.dropout,
            batch_first=True, norm_first=True, activation="gelu",
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, config.encoder_layers, enable_nested_tensor=False)
        self.dense = nn.Sequential(nn.Linear(user_dense_dim, config.dim), nn.GELU())
        self.out = nn.Sequential(nn.LayerNorm(2 * config.dim), nn.Linear(2 * config.dim, config.dim))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, history_emb: torch.Tensor, history: torch.Tensor, user_dense: torch.Tensor) -> torch.Tensor:
        """history_emb ``[B, L, D]`` (item encodings of ``history``), history ``[B, L]``, user_dense ``[B, F_u]``."""
        L = history.shape[1]
        pad = history == 0
        # a user with no history attends to one (zero) slot instead of none, avoiding NaNs
        pad = pad & ~(pad.all(dim=1, keepdim=True) & (torch.arange(L, device=history.device) == 0))
        x = self.dropout(history_emb + self.position.weight[:L])
        h = self.encoder(x, src_key_padding_mask=pad)
        # newest item first: its position summarises the sequence; mean of valid slots adds stability
        valid = (~pad).unsqueeze(-1).float()
        pooled = h[:, 0] + (h * valid).sum(1) / valid.sum(1).clamp(min=1)
        return self.out(torch.cat([pooled, self.dense(user_dense)], dim=-1))


class TwoTower(nn.Module):
    """Retrieval model. ``user_embedding`` and ``item_embedding`` return L2-normalised ``[*, D]``."""

    def __init__(self, config: ModelConfig, n_item_rows: int, n_categories: int, user_dense_dim: int,
                 item_dense_dim: int):  # fmt: skip
        super().__init__()
        self.config = config
        self.items = ItemEncoder(config, n_item_rows, n_categories, item_dense_dim)
        self.user = UserEncoder(config, user_dense_dim)
        self.history_proj = nn.Linear(config.dim, config.dim)

    def item_embedding(self, index, categories, dense) -> torch.Tensor:
        return F.normalize(self.items(index, categories, dense), dim=-1)

    def user_embedding(self, history, user_dense, item_categories, item_dense) -> torch.Tensor:
        """history ``[B, L]``; item_categories ``[N, C]`` and item_dense ``[N, F_i]`` are the catalog tables."""
        hist_emb = self.history_proj(self.items(history, item_categories[history], item_dense[history]))
        return F.normalize(self.user(hist_emb, history, user_dense), dim=-1)


def sampled_softmax_loss(
    user: torch.Tensor,
    positive: torch.Tensor,
    positive_index: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    extra: torch.Tensor | None = None,
    extra_index: torch.Tensor | None = None,
    extra_log_q: float = 0.0,
) -> torch.Tensor:
    """In-batch sampled softmax with logQ correction (Yi et al., RecSys 2019).

    user ``[B, D]``, positive ``[B, D]`` (normalised), positive_index ``[B]``, log_q ``[B]`` = log of
    each positive's chance to appear in a batch. ``extra`` ``[M, D]`` are uniformly sampled negatives
    ("mixed negatives") with their own constant log q. In-batch copies of a row's own positive are
    masked, so a popular item is never its own negative.
    """
    logits = user @ positive.T / temperature - log_q[None, :]
    same = positive_index[None, :] == positive_index[:, None]
    logits = logits.masked_fill(same & ~torch.eye(len(user), dtype=torch.bool, device=user.device), float("-inf"))
    if extra is not None:
        extra_logits = user @ extra.T / temperature - extra_log_q
        extra_logits = extra_logits.masked_fill(extra_index[None, :] == positive_index[:, None], float("-inf"))
        logits = torch.cat([logits, extra_logits], dim=1)
    target = torch.arange(len(user), device=user.device)
    return F.cross_entropy(logits, target)
