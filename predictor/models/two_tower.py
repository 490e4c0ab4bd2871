"""Two-tower retrieval: a user encoder over the recent-item sequence (or the order-free item set) and user
features, an item encoder over item id and item features, L2-normalised embeddings, in-batch sampled
softmax with logQ correction.

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


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` with its mask drawn from raw random bits: each element is dropped when a 16-bit draw
    falls below ``p`` (so the rate is ``p`` rounded to 1 / 65,536) and survivors are scaled by
    ``1 / (1 - rate)``. Filling int64 words with ``random_`` and reading them as int16 is cheaper than
    ``torch.rand``'s float draw and torch's CPU bernoulli kernel (``bench/train.py``, ``kernels``), and it
    uses torch's generator, so ``torch.manual_seed`` still fixes the masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        threshold = round(self.p * 65536)
        # the full int64 range: ``random_()`` alone leaves the sign bit, so every fourth int16, non-negative
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        draws = words.view(torch.int16)[: x.numel()].view(x.shape)
        # int16 draws are uniform over [-32768, 32767]; one float mask holding 0 or the scale, so the forward
        # and the backward are one multiply each
        return x * (draws >= threshold - 32768).to(x.dtype).mul_(65536 / (65536 - threshold))


class MaskDropoutAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose training-time dropout of the attention probabilities draws its mask
    with :class:`MaskDropout`. Inside ``scaled_dot_product_attention`` that dropout is torch's CPU
    bernoulli kernel (``bench/train.py``, ``kernels``: ``attention_ms`` times this class against the
    parent); here the same attention is computed with the dropout between softmax and the value product.
    Evaluation, serving and a dropout of 0 run the parent's path (SDPA, its flash kernel or the encoder's
    fused fast path), with the same weights."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__(dim, heads, dropout=dropout, batch_first=True)
        self.probability_dropout = MaskDropout(dropout)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
        own_path = (
            self.training
            and self.dropout > 0
            and query is key is value
            and attn_mask is not None
            and key_padding_mask is None
        )
        if not own_path or need_weights:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, **kwargs)
        B, L, D = query.shape
        H = self.num_heads
        # [3, B * H, L, D / H]: the packed input projection split into query, key and value per head
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, B * H, L, D // H)
        # attn_mask: additive, [L, L] or [B * H, L, L], as nn.TransformerEncoder passes it on
        scores = torch.baddbmm(attn_mask, q, k.transpose(1, 2), alpha=(D // H) ** -0.5)
        out = torch.bmm(self.probability_dropout(scores.softmax(dim=-1)), v)
        out = out.view(B, H, L, D // H).transpose(1, 2).reshape(B, L, D)
        return self.out_proj(out), None


class ItemEncoder(nn.Module):
    """Item id embedding + category embedding + dense item features → ``[*, D]`` (not normalised)."""

    def __init__(self, config: ModelConfig, n_item_rows: int, n_categories: int, item_dense_dim: int):
        super().__init__()
        self.id_embedding = IdEmbedding(n_item_rows, config.dim, config.embedding_fp16)
        self.category = nn.Linear(max(n_categories, 1), config.dim, bias=False)
        self.dense = nn.Linear(item_dense_dim, config.dim)
        self.mix = nn.Sequential(
            nn.Linear(3 * config.dim, config.dim), nn.GELU(), nn.Linear(config.dim, config.dim)
        )
        self.n_categories = n_categories

    def forward(self, index: torch.Tensor, categories: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """index ``[*]`` int64, categories ``[*, C]``, dense ``[*, F_i]`` → ``[*, D]``."""
        e = self.id_embedding(index)
        c = self.category(categories) if self.n_categories else torch.zeros_like(e)
        return e + self.mix(torch.cat([e, c, self.dense(dense)], dim=-1))


class UserEncoder(nn.Module):
    """Causal self-attention over the oldest-first history plus per-position user features.

    Trained SASRec-style: one pass over a window of L items yields a user state after every item, each
    predicting the next one, so a window teaches L labels instead of one.
    """

    def __init__(self, config: ModelConfig, user_dense_dim: int):
        super().__init__()
        self.position = nn.Embedding(config.max_history, config.dim)
        layer = nn.TransformerEncoderLayer(
            config.dim,
            config.encoder_heads,
            dim_feedforward=4 * config.dim,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        for name in ("dropout", "dropout1", "dropout2"):
            setattr(layer, name, MaskDropout(config.dropout))
        layer.self_attn = MaskDropoutAttention(config.dim, config.encoder_heads, config.dropout)
        self.encoder = nn.TransformerEncoder(layer, config.encoder_layers, enable_nested_tensor=False)
        self.dense = nn.Sequential(nn.Linear(user_dense_dim, config.dim), nn.GELU())
        self.out = nn.Sequential(nn.LayerNorm(2 * config.dim), nn.Linear(2 * config.dim, config.dim))
        self.dropout = MaskDropout(config.dropout)

    def forward(self, history_emb: torch.Tensor, user_dense: torch.Tensor, layout=None) -> torch.Tensor:
        """history_emb ``[B, L, D]`` left-aligned oldest first (padding after the last item),
        user_dense ``[B, L, F_u]`` (features at each position) → states ``[B, L, D]``.

        Only a causal mask: a real position never sees the padding that follows it, so no key-padding
        mask is needed (and no all-masked rows that would turn into NaNs).

        ``layout`` = (positions, windows) ``[B, L]`` int64 for rows that pack several windows
        (``TrainingBatches.windows``): each token's position in its window and its window's index (-1:
        padding). A token attends causally within its own window only, so each window's states are the
        ones it would get in a row of its own; padding attends to padding, so no row is all masked.
        """
        L = history_emb.shape[1]
        if layout is None:
            causal = torch.triu(torch.full((L, L), float("-inf"), device=history_emb.device), diagonal=1)
            x = self.dropout(history_emb + self.position.weight[:L])
            h = self.encoder(x, mask=causal, is_causal=True)
        else:
            positions, windows = layout
            earlier = torch.ones(L, L, dtype=torch.bool, device=windows.device).tril()
            allowed = (windows[:, :, None] == windows[:, None, :]) & earlier
            # [B * heads, L, L], the per-sample mask nn.MultiheadAttention takes
            mask = torch.zeros(allowed.shape, device=windows.device).masked_fill_(~allowed, float("-inf"))
            mask = mask.repeat_interleave(self.encoder.layers[0].self_attn.num_heads, dim=0)
            # index_select rather than the embedding call: a cheaper backward (TwoTower.forward)
            at = self.position.weight.index_select(0, positions.flatten()).view(*positions.shape, -1)
            x = self.dropout(history_emb + at)
            h = self.encoder(x, mask=mask)
        return self.out(torch.cat([h, self.dense(user_dense)], dim=-1))


class SetUserEncoder(nn.Module):
    """Order-free pooling of the history plus the user's features: one state per user.

    For random splits, whose held-out items are any of the user's: the sum of the read items' vectors over
    the square root of their count (Mult-DAE's normalised multi-hot input; order, position and recency
    carry nothing there), a residual MLP, plus a linear map of the user's features. The read
    items' vectors are the encoder's own id table (``read``; Mult-DAE's encoder weights), not the item
    tower's: an item read and an item to predict play different roles (in a scratch comparison on
    latest-small's random split, not in the repo, one shared table scored lower). Trained to predict a
    held-out share of the user's items from the rest (``training.fit_retrieval``).
    """

    def __init__(self, config: ModelConfig, user_dense_dim: int, n_item_rows: int):
        super().__init__()
        self.read = IdEmbedding(n_item_rows, config.dim, config.embedding_fp16)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim)
        )
        # the user's features shift the state; zero at first, so a log without them starts from the items
        self.dense = nn.Linear(user_dense_dim, config.dim)
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)
        self.dropout = MaskDropout(config.dropout)

    def forward(self, history_emb: torch.Tensor, read: torch.Tensor, user_dense: torch.Tensor):
        """history_emb ``[B, L, D]``, read ``[B, L]`` bool (False: padding), user_dense ``[B, F_u]`` →
        states ``[B, D]`` (not normalised); a user who read nothing gets the features' state alone."""
        count = read.sum(dim=1, keepdim=True).clamp(min=1).to(history_emb.dtype)
        pooled = (history_emb * read[..., None]).sum(dim=1) / count.sqrt()
        return pooled + self.mlp(self.dropout(pooled)) + self.dense(user_dense)


class TwoTower(nn.Module):
    """Retrieval model. ``user_embedding`` and ``item_embedding`` return L2-normalised ``[*, D]``."""

    def __init__(
        self,
        config: ModelConfig,
        n_item_rows: int,
        n_categories: int,
        user_dense_dim: int,
        item_dense_dim: int,
    ):
        super().__init__()
        self.config = config
        self.items = ItemEncoder(config, n_item_rows, n_categories, item_dense_dim)
        if config.user_encoder == "set":
            self.user = SetUserEncoder(config, user_dense_dim, n_item_rows)
        else:
            self.user = UserEncoder(config, user_dense_dim)
        self.history_proj = nn.Linear(config.dim, config.dim)

    def item_embedding(self, index, categories, dense) -> torch.Tensor:
        return F.normalize(self.items(index, categories, dense), dim=-1)

    def user_states(self, window, user_dense, item_categories, item_dense) -> torch.Tensor:
        """The sequence encoder's states: window ``[B, L]`` left-aligned oldest-first item indexes,
        user_dense ``[B, L, F_u]`` → ``[B, L, D]`` normalised user embeddings after each position.
        item_categories ``[N, C]`` and item_dense ``[N, F_i]`` are the catalog tables."""
        hist_emb = self.history_proj(self.items(window, item_categories[window], item_dense[window]))
        return F.normalize(self.user(hist_emb, user_dense), dim=-1)

    def history_table(self, item_categories, item_dense, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The history encoder's input for item ``rows`` (default: every row of the catalog tables) →
        ``[len(rows), D]`` (row 0 = padding, as the per-window computation gives it): computed once per model
        or item refresh, gathered per request. The set encoder reads its own id table (row 0: zeros)."""
        if rows is None:
            rows = torch.arange(item_categories.shape[0], device=item_categories.device)
        if self.config.user_encoder == "set":
            return self.user.read(rows)
        return self.history_proj(self.items(rows, item_categories[rows], item_dense[rows]))

    def user_embedding(self, window, lengths, user_dense, history_table, trim: bool = True) -> torch.Tensor:
        """The user embedding after the last real item: window ``[B, L]`` left-aligned, lengths ``[B]``
        (>= 1, or 0 for no history), user_dense ``[B, F_u]``, ``history_table`` from :meth:`history_table`
        → ``[B, D]``.

        Equal to the last real position of :meth:`user_states`, at a fraction of its cost: positions after
        the longest history in the batch are padding that the causal mask hides from every real
        position, so they are cut; and the output head runs on the last position only. The set encoder
        (``config.user_encoder="set"``) pools the ``lengths`` real items, in any order.
        """
        if trim:  # data-dependent: ``trim=False`` keeps the graph static (torch.export)
            window = window[:, : max(int(lengths.max()), 1) if len(lengths) else 1]
        L = window.shape[1]
        if self.config.user_encoder == "set":
            read = torch.arange(L, device=window.device)[None, :] < lengths[:, None]
            return F.normalize(self.user(history_table[window], read, user_dense), dim=-1)
        causal = torch.triu(torch.full((L, L), float("-inf"), device=window.device), diagonal=1)
        x = self.user.dropout(history_table[window] + self.user.position.weight[:L])
        h = self.user.encoder(x, mask=causal, is_causal=True)
        last = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, h.shape[-1])
        h_last = h.gather(1, last).squeeze(1)
        out = self.user.out(torch.cat([h_last, self.user.dense(user_dense)], dim=-1))
        return F.normalize(out, dim=-1)

    def forward(self, window, user_dense, targets, negatives, item_categories, item_dense, layout=None):
        """Training step → (states ``[B, L, D]``, target embeddings ``[B, L, D]``, negatives ``[M, D]``);
        ``layout``: packed windows' positions and windows (:meth:`UserEncoder.forward`).
        The set encoder: window ``[B, L]`` the read items (0: padding), user_dense ``[B, F_u]``, targets
        ``[B, T]`` the held-out items → states ``[B, D]``, target embeddings ``[B, T, D]``, negatives.

        The item encoder, the history projection and the normalisation each run once over the distinct
        items of the step (history, targets and negatives overlap: the targets are the history shifted
        by one), and each use gathers from them. One module call, so DistributedDataParallel sees every
        parameter used in the step.
        """
        set_encoder = self.config.user_encoder == "set"
        # the set encoder reads its own id table, so the item tower encodes no history items for it
        history_ids = window.new_empty(0) if set_encoder else window.flatten()
        uses = torch.cat([history_ids, targets.flatten(), negatives])
        # the distinct ids and where each use finds its row, by counting: the ids index the catalog
        present = torch.zeros(item_categories.shape[0], dtype=torch.bool, device=uses.device)
        present[uses] = True
        ids = torch.nonzero(present).squeeze(1)
        inverse = (torch.cumsum(present, 0) - 1)[uses]
        encoded = self.items(ids, item_categories[ids], item_dense[ids])  # [U, D]
        n_window, n_targets = history_ids.numel(), targets.numel()
        # normalised in fp32 (a no-op cast without autocast): the loss divides these by the temperature
        if set_encoder:
            states = F.normalize(self.user(self.user.read(window), window > 0, user_dense).float(), dim=-1)
        else:
            # index_select, not advanced indexing: its backward is an index_add, not the accumulating
            # index_put that advanced indexing's backward runs
            history = self.history_proj(encoded).index_select(0, inverse[:n_window]).view(*window.shape, -1)
            states = F.normalize(self.user(history, user_dense, layout).float(), dim=-1)
        normalised = F.normalize(encoded.float(), dim=-1)
        positive = normalised.index_select(0, inverse[n_window : n_window + n_targets]).view(
            *targets.shape, -1
        )
        neg = normalised.index_select(0, inverse[n_window + n_targets :])
        return states, positive, neg


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over ``user @ candidates.T`` without the autograd graph of a ``[P, M]``
    logits matrix: the logits are made, exponentiated and normalised in row blocks that stay in cache, the
    probabilities are kept for the backward, which turns them into the logits' gradient in place. On 2 CPU
    cores it took 817 against 1,512 ms at 5,699 labels × 9,742 items against ``F.cross_entropy`` on the
    same logits (``bench/train.py``'s ``kernels`` probe); the values and gradients are the same
    (``tests/test_models_unit.py``)."""

    BLOCK = 1024  # rows per block: a [1024, 10k] fp32 block is 40 MB, about the size of a server's L3

    @staticmethod
    def forward(ctx, user, candidates, bias, extra, target, excluded, own):
        P, M = user.shape[0], candidates.shape[0]
        BLOCK = _SoftmaxCrossEntropy.BLOCK
        probs = torch.empty(P, M, dtype=user.dtype, device=user.device)
        lse = torch.empty(P, dtype=user.dtype, device=user.device)
        picked = torch.empty(P, dtype=user.dtype, device=user.device)
        p_extra = torch.zeros(P, dtype=user.dtype, device=user.device)
        # the excluded candidates: on CPU the few (row, column) pairs, found once, against a comparison
        # and a fill over every block element (``bench/train.py``, ``kernels``: ``excluded_mask_ms``); on
        # an accelerator the dense mask, which needs no host sync for the pairs' count
        sparse = excluded is not None and user.device.type == "cpu"
        if sparse:
            pair_rows, pair_columns = equal_pairs(own, excluded)
            bounds = torch.searchsorted(pair_rows, torch.arange(0, P + BLOCK, BLOCK)).tolist()
        for b, s in enumerate(range(0, P, BLOCK)):
            rows = slice(s, s + BLOCK)
            block = probs[rows]
            torch.mm(user[rows], candidates.T, out=block)
            if bias is not None:
                block.add_(bias)
            if sparse:
                pairs = slice(bounds[b], bounds[b + 1])
                block[pair_rows[pairs] - s, pair_columns[pairs]] = float("-inf")
            elif excluded is not None:
                block.masked_fill_(excluded[None, :] == own[rows, None], float("-inf"))
            t = target[rows]
            column = block.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            top = block.amax(dim=1)
            if extra is not None:
                top = torch.maximum(top, extra[rows])
                column = torch.where(t < 0, extra[rows], column)
            block.sub_(top[:, None]).exp_()
            total = block.sum(dim=1)
            if extra is not None:
                e = torch.exp(extra[rows] - top)
                total += e
                p_extra[rows] = e / total
            block.div_(total[:, None])
            lse[rows] = top + total.log()
            picked[rows] = column
        ctx.save_for_backward(user, candidates, target, probs, p_extra)
        ctx.has_extra = extra is not None
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad):
        user, candidates, target, probs, p_extra = ctx.saved_tensors
        P = probs.shape[0]
        hit = target >= 0
        rows = torch.nonzero(hit).squeeze(1)
        probs[rows, target[rows]] -= 1.0  # the forward's buffer is not needed again: it becomes the gradient
        coef = grad / P
        g_user = torch.mm(probs, candidates).mul_(coef)
        g_candidates = torch.mm(probs.T, user).mul_(coef)
        g_extra = (p_extra - (~hit).to(p_extra.dtype)) * coef if ctx.has_extra else None
        return g_user, g_candidates, None, g_extra, None, None, None


def equal_pairs(own: torch.Tensor, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every ``excluded[column] == own[row]``, in row then column order: own ``[P]``,
    excluded ``[M]`` int64 → two ``[H]`` int64. The columns are sorted once and each row's equal run found
    by binary search, so the cost follows P log M and the H pairs, not P × M."""
    order = torch.argsort(excluded, stable=True)  # stable: each row's columns in ascending order
    ordered = excluded[order]
    first = torch.searchsorted(ordered, own)
    counts = torch.searchsorted(ordered, own, right=True) - first
    rows = torch.repeat_interleave(torch.arange(len(own), device=own.device), counts)
    # the k-th pair of a row is its run's k-th column: run start + (pair index - the row's first pair)
    start = torch.repeat_interleave(first - (torch.cumsum(counts, 0) - counts), counts)
    return rows, order[torch.arange(len(rows), device=own.device) + start]


def softmax_cross_entropy(
    user: torch.Tensor,
    candidates: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
    own: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of each row's softmax over ``user @ candidates.T + bias`` and, when given, one
    more logit per row, ``extra``. user ``[P, D]``, candidates ``[M, D]``, bias ``[M]``, extra ``[P]``;
    target ``[P]`` int64 is the label's candidate column, or -1 for the ``extra`` logit; a candidate whose
    ``excluded [M]`` index equals the row's ``own [P]`` index is left out of that row's softmax.
    Equal to ``F.cross_entropy`` over the concatenated logits (see :class:`_SoftmaxCrossEntropy`)."""
    return _SoftmaxCrossEntropy.apply(user, candidates, bias, extra, target, excluded, own)


def sampled_softmax_loss(
    user: torch.Tensor,
    positive: torch.Tensor,
    positive_index: torch.Tensor,
    negatives: torch.Tensor,
    negative_index: torch.Tensor,
    negative_log_q: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Sampled softmax with logQ correction (Yi et al., RecSys 2019).

    user ``[P, D]`` and positive ``[P, D]`` (normalised) for P labelled positions, positive_index ``[P]``;
    negatives ``[M, D]`` with their item indexes ``[M]`` and ``log q`` ``[M]`` = log of the chance each was
    sampled (in-batch positives: proportional to popularity; uniform extras: M / N). A negative equal
    to the row's own positive is masked, so a popular item is never its own negative.
    """
    scaled = user / temperature
    own = (scaled * positive).sum(-1)
    target = torch.full((len(user),), -1, dtype=torch.long, device=user.device)
    return softmax_cross_entropy(
        scaled,
        negatives,
        target,
        bias=-negative_log_q,
        extra=own,
        excluded=negative_index,
        own=positive_index,
    )


def exact_softmax_loss(user: torch.Tensor, items: torch.Tensor, target: torch.Tensor, temperature: float):
    """Cross-entropy over the whole catalog: user ``[P, D]`` against every item ``[N, D]`` (normalised),
    target ``[P]`` the label's row in ``items``. It is the sampled loss with every item a negative, log q = 0
    and the label's own column scored as the positive (``test_full_softmax_is_exact_cross_entropy_...``)."""
    return softmax_cross_entropy(user / temperature, items, target)


def all_items_softmax_loss(
    user: torch.Tensor,
    candidates: torch.Tensor,
    log_q: torch.Tensor,
    positive: torch.Tensor,
    excluded: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Several positives per user state (PinnerFormer's all-action loss, Mult-VAE's multinomial
    likelihood): user ``[P, D]`` against candidates ``[M, D]`` (normalised) with their ``log q [M]``;
    positive ``[P, M]`` bool marks each state's positives among the candidates, excluded ``[P, M]`` bool
    the candidates left out of its softmax (items it has read). Each state's loss is the mean negative
    log-likelihood of its positives; states without one are skipped."""
    logits = (user @ candidates.T / temperature - log_q[None, :]).masked_fill(excluded, float("-inf"))
    log_p = torch.log_softmax(logits, dim=1)
    count = positive.sum(dim=1)
    keep = count > 0
    per_state = -(log_p.masked_fill(~positive, 0.0)).sum(dim=1)[keep] / count[keep]
    return per_state.mean() if len(per_state) else logits.sum() * 0.0
