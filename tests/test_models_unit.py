"""Model building blocks: shapes and dtypes, loss, metrics against hand-computed cases, data split."""

import numpy as np
import pandas as pd
import pytest
import torch

from predictor.data.schema import Interactions, validate_events, validate_items
from predictor.models.config import TrainConfig, model_config
from predictor.models.data import UserFeatureIndex, build_split, make_index
from predictor.models.evaluate import ranking_metrics, top_k_excluding_seen
from predictor.models.ranker import Ranker
from predictor.models.recommender import TwoStageRecommender
from predictor.models.two_tower import TwoTower, sampled_softmax_loss
from predictor.models.windows import training_windows
from tests.conftest import events_frame


def test_ranking_metrics_by_hand():
    top = np.array([[5, 3, 9], [1, 2, 4], [7, 8, 6]])
    target = np.array([3, 4, 0])
    m = ranking_metrics(top, target, n_items=10, ks=(1, 3))
    assert m["recall@1"] == 0.0
    assert m["recall@3"] == pytest.approx(2 / 3)
    # hits at rank 1 and rank 2 (0-based): 1/log2(3) and 1/log2(4)
    assert m["ndcg@3"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / 3)
    assert m["coverage@10"] == pytest.approx(9 / 10)


def test_ranking_metrics_multi_by_hand():
    """Leaderboard metrics with several test items per user: Recall@K = hits in the top K / |test set|;
    NDCG@K = DCG with binary gains 1/log2(rank + 2) over the ideal DCG of min(K, |test set|) hits."""
    from predictor.models.evaluate import ranking_metrics_multi

    def ideal(n):  # DCG of n hits at ranks 0 .. n-1: 1/log2(2) + 1/log2(3) + ... + 1/log2(n + 1)
        return sum(1 / np.log2(r + 2) for r in range(n))

    top = np.arange(1000, 1060).reshape(3, 20)  # 20 ranked items per user, none a test item yet
    a, b, c = np.arange(1, 26), np.arange(101, 116), np.array([201, 202, 203])  # 25, 15 and 3 test items
    top[0, [1, 4, 12]] = a[:3]  # |test| 25 > both K: hits at ranks 1 and 4 (top 10) and 12
    top[1, [0, 9, 10, 19]] = b[:4]  # |test| 15, between K = 10 and 20: hits at the edges of both cuts
    top[2, [0, 14]] = c[:2]  # |test| 3 < both K: one hit in the top 10, one more in the top 20, one missed
    m = ranking_metrics_multi(top, [a, b, c], ks=(10, 20))
    assert m["recall@10"] == pytest.approx((2 / 25 + 2 / 15 + 1 / 3) / 3)
    assert m["recall@20"] == pytest.approx((3 / 25 + 4 / 15 + 2 / 3) / 3)
    ndcg10 = [
        (1 / np.log2(3) + 1 / np.log2(6)) / ideal(10),
        (1 / np.log2(2) + 1 / np.log2(11)) / ideal(10),
        (1 / np.log2(2)) / (1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)),
    ]
    ndcg20 = [
        (1 / np.log2(3) + 1 / np.log2(6) + 1 / np.log2(14)) / ideal(20),
        (1 / np.log2(2) + 1 / np.log2(11) + 1 / np.log2(12) + 1 / np.log2(21)) / ideal(15),
        (1 / np.log2(2) + 1 / np.log2(16)) / (1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)),
    ]
    assert m["ndcg@10"] == pytest.approx(np.mean(ndcg10))
    assert m["ndcg@20"] == pytest.approx(np.mean(ndcg20))
    # a user whose test set is exactly their first three recommendations scores 1, whatever K
    assert ranking_metrics_multi(top[:1], [top[0, :3]], ks=(10, 20)) == {
        "recall@10": 1.0,
        "ndcg@10": 1.0,
        "recall@20": 1.0,
        "ndcg@20": 1.0,
    }


def test_top_k_excludes_seen_and_padding(small_data):
    split = build_split(small_data)
    users = np.array([1, 2])
    end = split.train_len[users]
    scores = torch.arange(split.n_items + 1, dtype=torch.float32).repeat(2, 1)
    top = top_k_excluding_seen(scores, split, users, end, 5)
    for row, u, e in zip(top, users, end):
        assert not set(row) & set(split.sequences[u, :e])
        assert 0 not in row
        assert list(row) == sorted(row, reverse=True)


def test_split_is_temporal_leave_last_out():
    events, _ = validate_events(
        events_frame(
            [
                (7, 1, "2026-01-03"),
                (7, 2, "2026-01-01"),
                (7, 3, "2026-01-02"),
                (7, 4, "2026-01-04"),
                (8, 1, "2026-01-01"),
            ]
        ),
        "x",
    )
    items = validate_items(pd.DataFrame({"item_id": [1, 2, 3, 4]}), "i")
    split = build_split(Interactions(events, items))
    u7, u8 = split.users.index([7, 8])
    assert list(split.items.raw(split.sequences[u7, :4])) == [2, 3, 1, 4]
    assert split.train_len[u7] == 2 and split.has_holdout[u7]
    assert split.train_len[u8] == 1 and not split.has_holdout[u8]
    window, lengths = split.window(np.array([u7]), np.array([3]), 2)
    assert list(split.items.raw(window[0])) == [3, 1] and lengths[0] == 2
    users, ends = training_windows(split, 50)
    assert list(zip(users, ends)) == [(u7, 2)]


def test_jittered_windows_cover_every_label_and_move_between_epochs():
    rng = np.random.default_rng(0)
    lengths = np.array([0, 1, 2, 7, 50, 51, 173])
    seq = np.zeros((len(lengths), lengths.max()), np.int64)
    seq[np.arange(lengths.max())[None, :] < lengths[:, None]] = 1

    class Split:  # the two fields training_windows reads
        train_len = lengths

    plain = training_windows(Split, 10)
    starts = []
    for _ in range(5):
        users, ends = training_windows(Split, 10, rng)
        for u, n in enumerate(lengths):
            covered = set()
            for e in ends[users == u]:
                assert 1 < e <= n  # every window ends inside the training events and has a label
                covered |= set(range(max(e - 10, 1), e))
            assert covered == set(range(1, n))  # every label position, none invented
            newest_first = np.sort(ends[users == u])[::-1]
            if n <= 1:
                assert len(newest_first) == 0  # no label, no window
                continue
            # exactly one window ends at the last training event; the next one ends inside it (the
            # overlap is the shift, under max_len), and the older ones tile back to back, none repeated
            assert newest_first[0] == n and (len(newest_first) == 1 or n - 10 <= newest_first[1] < n)
            assert (np.diff(newest_first[1:]) == -10).all()
        starts.append(tuple(ends))
    assert len(set(starts)) > 1  # the cut moves from epoch to epoch
    # without an rng the cut is the fixed one: consecutive, non-overlapping chunks from the end
    users, ends = plain
    assert list(ends[users == 6]) == list(range(173, 2, -10))


def test_packed_windows_share_rows_without_overlap_and_full_ones_keep_a_row_each():
    from predictor.models.windows import pack_windows

    # first-fit decreasing by hand: 50 | 30 + 20 | 25 + 25 | 10
    row, offset, n_rows = pack_windows(np.array([25, 50, 10, 30, 25, 20]), 50)
    assert n_rows == 4
    assert {tuple(sorted(np.flatnonzero(row == r))) for r in range(4)} == {(1,), (3, 5), (0, 4), (2,)}
    lengths = np.random.default_rng(0).integers(1, 51, 300)
    row, offset, n_rows = pack_windows(lengths, 50)
    assert n_rows < len(lengths) and n_rows >= -(-lengths.sum() // 50)
    used = np.zeros((n_rows, 50), np.int64)
    for r, o, n in zip(row, offset, lengths):
        assert 0 <= o and o + n <= 50  # inside its row
        used[r, o : o + n] += 1
    assert used.max() == 1 and used.sum() == lengths.sum()  # no token slot shared, none lost
    assert len(set(row[lengths == 50])) == (lengths == 50).sum()  # a full window has its row alone


def test_training_windows_pack_into_rows_holding_each_window_whole(small_data):
    """Each packed window's tokens are its unpacked window's inputs, targets and positions, in one row, in
    order; the packed batch has fewer rows and the same labels."""
    from predictor.models.training import TrainingBatches

    split = build_split(small_data)
    users, ends = training_windows(split, 8)
    batches = TrainingBatches(split, 8, None, torch.device("cpu"))
    inputs, targets, _, (positions, windows), labels = batches.windows(split, users, ends)
    unpacked, lengths = split.window(users, ends - 1, 8)
    assert len(inputs) < len(users) and labels == lengths.sum()
    for w, n in enumerate(lengths):
        r, c = np.nonzero(windows.numpy() == w)
        assert len(set(r)) == 1 and (np.diff(c) == 1).all() and len(c) == n  # whole, in one row, in order
        assert (positions.numpy()[r, c] == np.arange(n)).all()
        assert (inputs.numpy()[r, c] == unpacked[w, :n]).all()
        start = ends[w] - 1 - n
        assert (targets.numpy()[r, c] == split.sequences[users[w], start + 1 : start + 1 + n]).all()
    assert (targets.numpy()[windows.numpy() < 0] == 0).all()  # padding has no label


@torch.no_grad()
def test_packed_rows_give_each_window_the_states_it_gets_alone():
    cfg = model_config("small")
    N, C, Fu, Fi, L = 30, 3, 10, 7, 12
    torch.manual_seed(4)
    tower = TwoTower(cfg, N + 1, C, Fu, Fi).eval()
    cats, dense = torch.rand(N + 1, C), torch.rand(N + 1, Fi)
    lengths = [5, 7, 12, 3, 4]  # packed: [7 + 5 | 12 | 3 + 4, padding]
    alone = [torch.randint(1, N + 1, (n,)) for n in lengths]
    features = [torch.rand(n, Fu) for n in lengths]
    rows = [(1, 0), (2,), (3, 4)]
    window = torch.zeros(3, L, dtype=torch.long)
    udense = torch.zeros(3, L, Fu)
    positions = torch.zeros(3, L, dtype=torch.long)
    windows = torch.full((3, L), -1)
    for r, members in enumerate(rows):
        at = 0
        for w in members:
            n = lengths[w]
            window[r, at : at + n], udense[r, at : at + n] = alone[w], features[w]
            positions[r, at : at + n], windows[r, at : at + n] = torch.arange(n), w
            at += n
    packed = tower.user(
        tower.history_proj(tower.items(window, cats[window], dense[window])), udense, (positions, windows)
    )
    for r, members in enumerate(rows):
        at = 0
        for w in members:
            n = lengths[w]
            own = tower.user_states(alone[w][None], features[w][None], cats, dense)[0]
            torch.testing.assert_close(
                torch.nn.functional.normalize(packed[r, at : at + n], dim=-1), own, atol=1e-5, rtol=1e-5
            )
            at += n


def test_mask_dropout_attention_is_the_parent_attention_with_its_own_probability_dropout():
    """In training the attention runs its own path (the dropout between softmax and the value product);
    with that dropout's mask keeping everything it equals nn.MultiheadAttention, and at rate p it drops."""
    from predictor.models.two_tower import MaskDropoutAttention

    torch.manual_seed(1)
    attention = MaskDropoutAttention(16, 2, 0.3)
    x = torch.randn(4, 9, 16)
    for mask in (
        torch.triu(torch.full((9, 9), float("-inf")), diagonal=1),  # causal, as the encoder passes it
        torch.zeros(8, 9, 9)
        .masked_fill_(torch.rand(8, 9, 9) < 0.3, float("-inf"))
        .diagonal_scatter(torch.zeros(8, 9), dim1=1, dim2=2),  # one per sample and head: packed rows
    ):
        expected = attention.eval()(x, x, x, need_weights=False, attn_mask=mask)[0]
        attention.train()
        attention.probability_dropout.p = 0.0  # its own path, nothing dropped
        torch.testing.assert_close(attention(x, x, x, need_weights=False, attn_mask=mask)[0], expected)
        attention.probability_dropout.p = 0.3
        assert not torch.allclose(attention(x, x, x, need_weights=False, attn_mask=mask)[0], expected)


def test_index_extension_keeps_old_rows():
    idx = make_index([10, 20, 30])
    bigger = idx.extended(np.array([25, 10, 5]))
    assert list(bigger.index([10, 20, 30])) == [1, 2, 3]
    assert list(bigger.index([5, 25, 99])) == [4, 5, 0]
    assert list(bigger.raw([4, 5, 0])) == [5, 25, -1]


def test_point_in_time_join_uses_only_earlier_snapshots():
    t = pd.to_datetime(["2026-01-01 00:00", "2026-01-02 00:00", "2026-01-03 00:00"], utc=True)
    profile = pd.DataFrame(
        {
            "user_id": [1, 1, 1],
            "event_timestamp": t,
            "events_1d": [1, 2, 3],
            "events_7d": 0,
            "events_30d": 0,
            "events_total": [1, 2, 3],
            "seconds_since_last_event": 0.0,
            "mean_rating": 0.0,
            "rating_count": 0,
            "category_affinity": [[1.0]] * 3,
        }
    )
    labels = pd.to_datetime(["2026-01-02 00:00", "2026-01-02 12:00", "2025-12-31 00:00"], utc=True).astype(
        "int64"
    )
    x = UserFeatureIndex(profile, 1).at(np.array([1, 1, 1]), labels.to_numpy())
    # a snapshot stamped exactly at the label time is not used; none before → zeros
    assert np.expm1(x[:, 3]).round().tolist() == [1.0, 2.0, 0.0]
    assert x[2].sum() == 0


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_tower_and_ranker_shapes(size):
    cfg = model_config(size)
    B, L, N, C, Fu, Fi = 4, cfg.max_history, 30, 5, 7 + 5, 7
    tower = TwoTower(cfg, N + 1, C, Fu, Fi)
    cats, dense = torch.rand(N + 1, C), torch.rand(N + 1, Fi)
    window = torch.randint(1, N + 1, (B, L))
    lengths = torch.tensor([L, 3, 1, 0])
    user = tower.eval().user_embedding(window, lengths, torch.rand(B, Fu), tower.history_table(cats, dense))
    assert user.shape == (B, cfg.dim) and user.dtype == torch.float32
    torch.testing.assert_close(user.norm(dim=1), torch.ones(B))
    items = tower.item_embedding(torch.arange(N + 1), cats, dense)
    assert items.shape == (N + 1, cfg.dim)
    ranker = Ranker(cfg, N + 1, C, Fu, Fi)
    K = 6
    cand = torch.randint(1, N + 1, (B, K))
    scores = ranker(
        user, items[window], window > 0, items[cand], cand, dense[cand], torch.rand(B, K), torch.rand(B, Fu)
    )
    assert scores.shape == (B, K) and torch.isfinite(scores).all()


@torch.no_grad()
def test_serving_user_embedding_equals_the_training_states_at_the_last_item():
    """The inference tower (precomputed history table, window cut to the longest history, head on the
    last position) computes exactly what the training path computes at each user's last real item."""
    cfg = model_config("small")
    B, L, N, C, Fu, Fi = 5, cfg.max_history, 40, 4, 7 + 4, 7
    torch.manual_seed(0)
    tower = TwoTower(cfg, N + 1, C, Fu, Fi).eval()
    cats, dense = torch.rand(N + 1, C), torch.rand(N + 1, Fi)
    cats[0], dense[0] = 0, 0
    lengths = torch.tensor([12, 3, 1, 7, 0])
    window = torch.randint(1, N + 1, (B, L)) * (torch.arange(L)[None, :] < lengths[:, None])
    udense = torch.rand(B, Fu)
    states = tower.user_states(window, udense[:, None, :].expand(-1, L, -1), cats, dense)
    expected = states[torch.arange(B), (lengths - 1).clamp(min=0)]
    got = tower.user_embedding(window, lengths, udense, tower.history_table(cats, dense))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_target_attention_equals_the_outer_product_formula():
    from predictor.models.ranker import TargetAttention

    torch.manual_seed(1)
    att = TargetAttention(16)
    B, K, L = 3, 7, 5
    history, candidates = torch.randn(B, L, 16), torch.randn(B, K, 16)
    mask = torch.rand(B, L) > 0.3
    mask[0] = False  # a user without history attends to nothing
    pre = (
        att.history(history)[:, None]
        + att.candidate(candidates)[:, :, None]
        + att.product(candidates[:, :, None, :] * history[:, None, :, :])
    )
    w = att.out(pre).squeeze(-1).masked_fill(~mask[:, None, :], float("-inf"))
    expected = torch.einsum("bkl,bld->bkd", torch.softmax(w, -1).nan_to_num(0.0), history)
    torch.testing.assert_close(att(history, mask, candidates), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ranker_equals_its_concatenated_first_layer_and_int8_copy_stays_close():
    """The per-user split of the first layer is the Linear over the whole concatenated row."""
    cfg = model_config("small")
    torch.manual_seed(2)
    B, K, L, N, C, Fu, Fi = 3, 9, 6, 40, 4, 7 + 4, 7
    ranker = Ranker(cfg, N + 1, C, Fu, Fi).eval()
    user, hist, cand = torch.randn(B, cfg.dim), torch.randn(B, L, cfg.dim), torch.randn(B, K, cfg.dim)
    index, dense, match, udense = (
        torch.randint(1, N + 1, (B, K)),
        torch.rand(B, K, Fi),
        torch.rand(B, K),
        torch.rand(B, Fu),
    )
    mask = torch.ones(B, L, dtype=torch.bool)
    got = ranker(user, hist, mask, cand, index, dense, match, udense)
    retrieval = (user[:, None, :] * cand).sum(-1)
    rows = torch.cat(
        [
            cand,
            ranker.attention(hist, mask, cand),
            user[:, None].expand(B, K, -1),
            ranker.item_id(index),
            udense[:, None].expand(B, K, -1),
            dense,
            retrieval[..., None],
            match[..., None],
        ],
        -1,
    )
    torch.testing.assert_close(
        got, ranker.mlp(rows).squeeze(-1) + ranker.retrieval_weight * retrieval, atol=1e-5, rtol=1e-5
    )
    int8 = torch.ao.quantization.quantize_dynamic(ranker, {torch.nn.Linear}, dtype=torch.qint8)
    assert (
        int8(user, hist, mask, cand, index, dense, match, udense) - got
    ).abs().max() < 0.1 * got.abs().max()


def test_fp16_embedding_storage_halves_table_memory():
    small = TwoTower(model_config("tiny"), 1001, 3, 10, 7).items.id_embedding.weight
    half = TwoTower(model_config("tiny", embedding_fp16=True), 1001, 3, 10, 7).items.id_embedding.weight
    assert half.dtype == torch.float16 and half.nbytes * 2 == small.nbytes


def test_large_size_has_over_100m_parameters_mostly_embeddings():
    cfg = model_config("large")
    with torch.device("meta"):
        tower = TwoTower(cfg, cfg.item_capacity, 20, 27, 7)
        ranker = Ranker(cfg, cfg.item_capacity, 20, 27, 7)
    total = sum(p.numel() for m in (tower, ranker) for p in m.parameters())
    embeddings = tower.items.id_embedding.weight.numel() + ranker.item_id.weight.numel()
    assert total >= 100_000_000 and embeddings / total > 0.9


def test_sampled_softmax_masks_accidental_hits():
    user = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    pos = user.clone()
    neg_index = torch.tensor([1, 2, 3])
    loss_masked = sampled_softmax_loss(
        user, pos, torch.tensor([1, 2, 3]), pos, neg_index, torch.zeros(3), 0.1
    )
    # every row's own positive is among the negatives and masked: only the two others compete
    logits = user @ pos.T / 0.1
    expected = torch.stack(
        [
            torch.logsumexp(torch.cat([logits[i, i : i + 1], logits[i][torch.arange(3) != i]]), 0)
            - logits[i, i]
            for i in range(3)
        ]
    ).mean()
    torch.testing.assert_close(loss_masked, expected)


def test_training_loss_decreases_with_fixed_seed(small_data):
    split = build_split(small_data)
    model = TwoStageRecommender(
        model_config("tiny"),
        TrainConfig(epochs=6, ranker_epochs=0, seed=1, patience=99, batch_size=16),
        device="cpu",
    )
    model.fit(split, progress=False)
    losses = [h["loss"] for h in model.history.retrieval]
    assert losses[-1] < losses[0]


def test_user_lines_format_and_multi_target_metrics(tmp_path):
    from predictor.data.loaders import load_user_lines
    from predictor.data.schema import DataValidationError
    from predictor.models.evaluate import Popularity, evaluate_targets, ranking_metrics_multi

    train = tmp_path / "train.txt"
    train.write_text("0 5 6 7\n1 5 8\n2 6 5 9 8\n")
    data = load_user_lines(train)
    assert data.events.groupby("user_id")["item_id"].agg(list).to_dict() == {
        0: [5, 6, 7],
        1: [5, 8],
        2: [6, 5, 9, 8],
    }
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1 2\n1 x\n")
    with pytest.raises(
        DataValidationError, match=r"bad\.txt, row 2, column 'item_id': expected an integer id, got 'x'"
    ):
        load_user_lines(bad)

    m = ranking_metrics_multi(np.array([[1, 2, 3], [4, 5, 6]]), [np.array([2, 9]), np.array([7])], ks=(3,))
    assert m["recall@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["ndcg@3"] == pytest.approx(((1 / np.log2(3)) / (1 + 1 / np.log2(3)) + 0) / 2)

    split = build_split(data, holdout=1)
    pop = Popularity().fit(split, "test")
    u = int(split.users.index([1])[0])
    targets = {u: split.items.index([6])}
    got = evaluate_targets(pop.rank(split), split, targets)
    # user 1 saw 5 and 8; the most popular unseen item is 6 → a hit at rank 0
    assert got["recall@10"] == 1.0 and got["ndcg@10"] == 1.0 and got["users"] == 1


def test_checkpoint_resume_continues_where_it_stopped(small_data, tmp_path):
    split = build_split(small_data)
    cfg = TrainConfig(epochs=2, ranker_epochs=0, seed=2, patience=99, batch_size=16)
    first = TwoStageRecommender(model_config("tiny"), cfg, device="cpu").fit(
        split, checkpoint_dir=tmp_path, progress=False
    )
    assert (tmp_path / "retrieval.pt").is_file()
    resumed = TwoStageRecommender(
        model_config("tiny"), TrainConfig(**{**cfg.__dict__, "epochs": 3}), device="cpu"
    )
    resumed.fit(split, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history.retrieval] == [1, 2, 3]
    assert resumed.history.retrieval[:2] == first.history.retrieval


def test_full_softmax_is_exact_cross_entropy_over_the_catalog():
    """With every item as a negative and log q = 0 (``full_softmax_items``), the sampled-softmax loss is the
    exact cross entropy over the whole catalog: the label's own column is masked and scored as the
    positive."""
    import torch.nn.functional as F

    from predictor.models.two_tower import sampled_softmax_loss

    g = torch.Generator().manual_seed(0)
    items = F.normalize(torch.randn(51, 8, generator=g), dim=-1)  # row 0 = padding
    users = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    labels = torch.tensor([1, 5, 5, 50, 2, 7])
    every = torch.arange(1, 51)
    loss = sampled_softmax_loss(users, items[labels], labels, items[every], every, torch.zeros(50), 0.1)
    exact = F.cross_entropy(users @ items[1:].T / 0.1, labels - 1)
    assert torch.allclose(loss, exact, atol=1e-5)


@pytest.mark.parametrize("rows", [7, 2500])  # one block, and several blocks with a ragged last one
def test_blocked_softmax_losses_equal_cross_entropy_over_the_logits_in_value_and_gradient(rows):
    """The sampled and exact losses run a blocked kernel with a hand-written backward; both must give the
    loss and the gradients of ``F.cross_entropy`` over the logits written out in full (in-batch negatives
    with duplicates and accidental hits, log q, the label scored as its own column)."""
    import torch.nn.functional as F

    from predictor.models.two_tower import _SoftmaxCrossEntropy, equal_pairs, exact_softmax_loss

    assert rows < _SoftmaxCrossEntropy.BLOCK or rows % _SoftmaxCrossEntropy.BLOCK
    g = torch.Generator().manual_seed(0)
    items = F.normalize(torch.randn(301, 16, generator=g), dim=-1).requires_grad_()
    users = F.normalize(torch.randn(rows, 16, generator=g), dim=-1).requires_grad_()
    labels = torch.randint(1, 301, (rows,), generator=g)
    negatives = labels[torch.randint(0, rows, (64,), generator=g)]  # duplicates, and hits of many rows
    log_q = torch.rand(64, generator=g)

    def reference_sampled():
        pos = (users * items[labels]).sum(-1, keepdim=True) / 0.1
        neg = (users @ items[negatives].T / 0.1 - log_q).masked_fill(
            negatives == labels[:, None], float("-inf")
        )
        return F.cross_entropy(torch.cat([pos, neg], dim=1), torch.zeros(rows, dtype=torch.long))

    cases = [
        (
            lambda: sampled_softmax_loss(
                users, items[labels], labels, items[negatives], negatives, log_q, 0.1
            ),
            reference_sampled,
        ),
        (
            lambda: exact_softmax_loss(users, items[1:], labels - 1, 0.1),
            lambda: F.cross_entropy(users @ items[1:].T / 0.1, labels - 1),
        ),
    ]
    assert bool((negatives == labels[:, None]).any())  # accidental hits are exercised
    pair_rows, pair_columns = equal_pairs(labels, negatives)  # the sampled loss's hits on CPU, as pairs
    expected = torch.nonzero(negatives[None, :] == labels[:, None])
    assert torch.equal(torch.stack([pair_rows, pair_columns], 1), expected)
    for blocked, reference in cases:
        got, want = blocked(), reference()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(got, (users, items)), torch.autograd.grad(want, (users, items))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["als", "bpr"])
def test_baselines_are_reproducible_for_a_seed(small_data, kind):
    from predictor.models.evaluate import ImplicitModel

    split = build_split(small_data)
    params = {"factors": 16, "iterations": 20}
    first = ImplicitModel(kind, params, seed=3).fit(split, "test")
    second = ImplicitModel(kind, params, seed=3).fit(split, "test")
    assert torch.equal(first.item_factors, second.item_factors)
    assert torch.equal(first.user_factors, second.user_factors)


@torch.no_grad()
def test_training_forward_encodes_each_item_once_and_equals_the_per_use_encodings():
    """The training step's one item-encoder pass over the distinct items gives the same history states,
    target and negative embeddings as encoding each use separately."""
    cfg = model_config("small")
    B, L, N, C, Fu, Fi = 4, 12, 30, 3, 7 + 3, 7
    torch.manual_seed(2)
    tower = TwoTower(cfg, N + 1, C, Fu, Fi).eval()
    cats, dense = torch.rand(N + 1, C), torch.rand(N + 1, Fi)
    window = torch.randint(0, N + 1, (B, L))
    targets = torch.randint(0, N + 1, (B, L))
    negatives = torch.randint(1, N + 1, (9,))
    udense = torch.rand(B, L, Fu)
    states, positive, neg = tower(window, udense, targets, negatives, cats, dense)
    torch.testing.assert_close(states, tower.user_states(window, udense, cats, dense))
    torch.testing.assert_close(positive, tower.item_embedding(targets, cats[targets], dense[targets]))
    torch.testing.assert_close(neg, tower.item_embedding(negatives, cats[negatives], dense[negatives]))


def test_mask_dropout_drops_at_rate_p_and_keeps_the_mean():
    from predictor.models.two_tower import MaskDropout

    torch.manual_seed(0)
    drop, x = MaskDropout(0.3), torch.ones(200_000)
    y = drop.train()(x)
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.01
    # the mask comes from int16 lanes of 64-bit words: every lane must drop at the rate, not only on average
    lanes = (y == 0).float().view(-1, 4).mean(dim=0)
    assert torch.all((lanes - 0.3).abs() < 0.01), lanes
    rate = round(0.3 * 65536) / 65536  # the rate, rounded to the 16-bit draw
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / (1 - rate))]
    assert abs(float(y.mean()) - 1.0) < 0.01
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(5)
    first = drop.train()(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), first)  # torch's seed fixes the mask


def test_the_ranker_gate_needs_a_gain_above_one_standard_error():
    from predictor.models.evaluate import beats_by_more_than_noise

    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.1, 600)
    served, stats = beats_by_more_than_noise(
        noise - noise.mean() + 0.002
    )  # mean 0.002, standard error ~0.004
    assert not served and stats["mean"] == pytest.approx(0.002)
    assert stats["standard_error"] == pytest.approx(noise.std(ddof=1) / np.sqrt(600))
    served, stats = beats_by_more_than_noise(noise - noise.mean() + 0.02)
    assert served and stats["mean"] > stats["standard_error"]
    assert beats_by_more_than_noise(np.array([0.5]))[0] is False  # one user: no error estimate, not served


def test_defaults_follow_the_data_and_the_user_wins():
    from predictor.models.defaults import EXACT_SOFTMAX_FIT_SCORES, EXACT_SOFTMAX_SCORES, MAX_EPOCHS, choose

    config, train, why = choose(1_682, 100_000)
    assert config.full_softmax_items == EXACT_SOFTMAX_SCORES // 100_000 and train.window_jitter
    assert config.dim == 128 and train.batch_size == 64
    assert set(why) == {
        "full_softmax_items",
        "window_jitter",
        "dim",
        "dropout",
        "temperature",
        "weight_decay",
        "lr",
        "batch_size",
    }
    # the budget is catalog x events: the same catalog on a log 10 x longer trains with sampled softmax
    big, big_train, why = choose(1_682, EXACT_SOFTMAX_SCORES // 1_682 + 1)
    assert big == model_config("small") and big_train == TrainConfig(epochs=MAX_EPOCHS) and why == {}
    # the exact softmax's epochs are capped by its cost; the user's epochs win
    capped = EXACT_SOFTMAX_FIT_SCORES // (9_742 * 100_836)
    assert 0 < capped < MAX_EPOCHS and choose(9_742, 100_836)[1].epochs == capped
    assert "exceed" in choose(9_742, 100_836)[2]["epochs"] and train.epochs == MAX_EPOCHS
    assert choose(9_742, 100_836, train_options={"epochs": 7})[1].epochs == 7
    assert choose(EXACT_SOFTMAX_SCORES // 100_000, 100_000)[0].full_softmax_items > 0  # the cap is inclusive
    assert choose(EXACT_SOFTMAX_SCORES // 100_000 + 1, 100_000)[0] == model_config("small")
    assert choose(1_682, 100_000, "tiny")[0] == model_config("tiny")  # measured on `small` only
    mine, mine_train, why = choose(
        1_682, 100_000, model_options={"dim": 32}, train_options={"window_jitter": False}
    )
    assert mine.dim == 32 and not mine_train.window_jitter and mine.dropout == 0.3
    assert why["dim"] == why["window_jitter"] == "set by the user"


def test_recommend_returns_raw_ids_and_scores_padded_and_equal_to_the_evaluated_ranking(small_data):
    """The estimator contract: raw user ids in; raw item ids [U, k] int64 and scores [U, k] float32 out,
    best first, seen items excluded, -1 / -inf past the catalog's unseen items; the same ranking the
    evaluation path scores; unknown users are refused by name."""
    split = build_split(small_data)
    model = TwoStageRecommender(model_config("tiny"), TrainConfig(epochs=1, ranker_epochs=1, seed=0))
    model.fit(split, progress=False)
    raw_users = split.users.raw(np.array([1, 2, 3]))
    ids, scores = model.recommend(raw_users, k=10)
    assert ids.shape == scores.shape == (3, 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 0)
    users = np.array([1, 2, 3])
    ranked = model.rank(split)(users, split.lengths[users], 10)
    assert np.array_equal(ids, split.items.raw(ranked))
    for row, user in enumerate(users):
        seen = set(split.items.raw(split.sequences[user, : split.lengths[user]]).tolist())
        assert not seen & set(ids[row].tolist())
    everything, tail = model.recommend(raw_users[:1], k=split.n_items + 5)
    unseen = split.n_items - len(set(split.sequences[1, : split.lengths[1]].tolist()) - {0})
    assert (everything[0] >= 0).sum() == unseen and np.all(everything[0, unseen:] == -1)
    assert np.all(np.isneginf(tail[0, unseen:])) and np.all(np.isfinite(tail[0, :unseen]))
    with pytest.raises(ValueError, match=r"user_ids not in the split: \[987654321\]"):
        model.recommend([987_654_321], k=5)


def test_training_precision_is_chosen_from_the_device_and_checked():
    from predictor.models.training import has_bf16_units, training_dtype

    cpu = torch.device("cpu")
    assert training_dtype(TrainConfig(precision="fp32"), cpu) is None
    assert training_dtype(TrainConfig(precision="bf16"), cpu) is torch.bfloat16
    assert training_dtype(TrainConfig(), cpu) is None  # the default: fp32
    auto = training_dtype(TrainConfig(precision="auto"), cpu)
    assert auto is (torch.bfloat16 if has_bf16_units(cpu) else None)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        TrainConfig(precision="fp16")


@pytest.mark.parametrize("softmax_items", [0, 10_000])  # sampled, then exact
def test_a_bf16_training_step_is_the_fp32_step_within_bf16_rounding(softmax_items):
    """bf16 autocast changes a step's arithmetic, not what it computes: the loss and the gradient (all
    parameters, one vector) agree with fp32's at the same weights, batch and negatives."""
    from predictor.data.synthetic import generate
    from predictor.models.training import TrainingBatches, retrieval_loss

    split = build_split(generate(n_events=3_000, n_users=100, n_items=150, n_categories=4, seed=3))
    config = model_config("tiny", dropout=0.0, full_softmax_items=softmax_items)
    train = TrainConfig(epochs=1, min_epochs=1, ranker_epochs=0, seed=0, precision="fp32")
    model = TwoStageRecommender(config, train).fit(split, progress=False)  # weights past the initial ones
    batches = TrainingBatches(split, config.max_history, model.user_features, model.device)
    users, ends = training_windows(split, config.max_history)
    window, targets, udense, layout, _ = batches.windows(split, users[:32], ends[:32])
    popularity = torch.as_tensor(split.item_popularity, dtype=torch.float32)
    p_item = (popularity + 1.0) / (popularity + 1.0).sum()

    def step(dtype):
        model.retrieval.zero_grad()
        torch.manual_seed(0)  # the same sampled negatives
        loss = retrieval_loss(
            config,
            split.n_items,
            model.retrieval,
            (window, targets, udense),
            model.item_tables(split),
            p_item,
            dtype=dtype,
            layout=layout,
        )
        loss.backward()
        grads = [p.grad.flatten() for p in model.retrieval.parameters() if p.grad is not None]
        return loss.item(), torch.cat(grads)

    loss32, grad32 = step(None)
    loss16, grad16 = step(torch.bfloat16)
    assert loss16 != loss32  # the forward did run in bf16 ...
    assert loss16 == pytest.approx(loss32, rel=2e-3)  # ... and it is the same step (measured: 3e-5, 1.2e-4)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.999  # measured 0.99998
    assert (grad16 - grad32).norm() < 0.05 * grad32.norm()  # measured 0.7 %
