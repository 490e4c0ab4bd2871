"""Random and published splits: the split maker, the one-line-per-user files, protocol detection, random
validation, per-epoch shuffling, the final fit on all train items, and the harness that runs them."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from predictor.data.loaders import load_any, load_user_lines
from predictor.data.schema import Interactions, validate_events, validate_items
from predictor.data.splits import random_user_split, split_protocol, write_user_lines
from predictor.models.config import TrainConfig, model_config
from predictor.models.data import build_split
from predictor.models.evaluate import holdout, interaction_matrix, per_user_scores, validation_metric
from predictor.models.recommender import TwoStageRecommender
from predictor.models.training import later_items
from predictor.models.windows import shuffled_training_items
from tests.conftest import events_frame


def _pairs(data: Interactions) -> set[tuple[int, int]]:
    return set(zip(data.events["user_id"].tolist(), data.events["item_id"].tolist()))


def test_random_user_split_holds_out_the_share_of_each_user(small_data):
    train, test = random_user_split(small_data, test_share=0.2, seed=3)
    distinct = small_data.events.drop_duplicates(["user_id", "item_id"])
    assert not _pairs(train) & _pairs(test)
    assert _pairs(train) | _pairs(test) == _pairs(Interactions(distinct, small_data.items))
    per_user = distinct.groupby("user_id").size()
    in_test = test.events.groupby("user_id").size().reindex(per_user.index, fill_value=0)
    expected = np.where(per_user >= 2, np.clip(np.round(0.2 * per_user), 1, per_user - 1), 0)
    assert (in_test.to_numpy() == expected).all()
    again, _ = random_user_split(small_data, test_share=0.2, seed=3)
    other, _ = random_user_split(small_data, test_share=0.2, seed=4)
    assert _pairs(again) == _pairs(train) and _pairs(other) != _pairs(train)
    with pytest.raises(ValueError, match="test_share"):
        random_user_split(small_data, test_share=1.0)


def test_user_lines_round_trip_and_protocol_detection(small_data, tmp_path):
    train, test = random_user_split(small_data, seed=0)
    train_file, test_file = (
        write_user_lines(train, tmp_path / "train.txt"),
        write_user_lines(test, tmp_path / "test.txt"),
    )
    first = train_file.read_text().splitlines()[0].split()
    assert first[1:] == sorted(first[1:], key=int)  # ids ascending: the order says nothing about time
    assert _pairs(load_user_lines(train_file)) == _pairs(train)
    assert split_protocol(load_any(train_file), load_any(test_file)) == "random"
    # the same events with real timestamps: the test sample is not after each user's train events
    assert split_protocol(train, test) == "random"
    # a temporal split: every user's test events are their newest
    newest = small_data.events.sort_values("timestamp").groupby("user_id").tail(1)
    older = small_data.events.drop(newest.index)
    assert (
        split_protocol(Interactions(older, small_data.items), Interactions(newest, small_data.items))
        == "temporal"
    )


def test_random_protocol_split_holds_out_a_random_sample_for_validation():
    rows = [(1, item, f"2026-01-{item:02d}") for item in range(1, 21)] + [
        (2, 1, "2026-01-01"),
        (2, 2, "2026-01-02"),
    ]
    events, _ = validate_events(events_frame(rows), "x")
    data = Interactions(events, validate_items(pd.DataFrame({"item_id": range(1, 21)}), "i"))
    split = build_split(data, holdout=1, protocol="random", validation_share=0.25, seed=0)
    u1, u2 = split.users.index([1, 2])
    assert split.validation_len[u1] == 5 and split.train_len[u1] == 15
    assert split.validation_len[u2] == 1 and split.train_len[u2] == 1  # at least one, never all
    order = split.items.raw(split.sequences[u1, :20])
    assert sorted(order) == list(range(1, 21)) and list(order) != list(range(1, 21))  # not time order
    users, end, targets = holdout(split, "validation")
    assert list(users) == [u1, u2] and list(end) == [15, 1]
    assert list(targets[0]) == list(split.sequences[u1, 15:20]) and list(targets[1]) == [
        split.sequences[u2, 1],
        0,
        0,
        0,
        0,
    ]
    assert validation_metric(split) == "recall@20"
    # the test stage trains on train + validation: every event
    assert (
        interaction_matrix(split, "test").sum() == 22 and interaction_matrix(split, "validation").sum() == 16
    )
    # a final fit holds nothing out
    full = build_split(data, holdout=0, protocol="random", seed=0)
    assert (full.train_len == full.lengths).all() and not full.validation_len.any()
    with pytest.raises(ValueError, match="holdout"):
        build_split(data, holdout=2, protocol="random")


def _one_user_random_split(n_events: int, n_items: int, validation_share: float):
    """User 1 reads items 1 .. ``n_events`` on consecutive days, of ``n_items`` items; a random split."""
    rows = [(1, item, f"2026-01-{item:02d}") for item in range(1, n_events + 1)]
    events, _ = validate_events(events_frame(rows), "x")
    data = Interactions(events, validate_items(pd.DataFrame({"item_id": range(1, n_items + 1)}), "i"))
    split = build_split(data, holdout=1, protocol="random", validation_share=validation_share, seed=0)
    return split, split.users.index([1])[0]


def test_shuffled_training_items_permute_training_positions_only():
    split, u = _one_user_random_split(12, 12, 0.25)
    n = split.train_len[u]
    seen = set()
    for draw in range(5):
        shuffled = shuffled_training_items(split, np.random.default_rng(draw))
        assert sorted(shuffled.sequences[u, :n]) == sorted(split.sequences[u, :n])
        assert list(shuffled.sequences[u, n:]) == list(split.sequences[u, n:])  # validation stays put
        seen.add(tuple(shuffled.sequences[u, :n]))
    assert len(seen) == 5


def test_per_user_scores_on_several_targets_by_hand():
    split, u = _one_user_random_split(10, 30, 0.3)
    held = list(split.sequences[u, 7:10])  # three validation targets

    def rank_fn(users, end, k):  # one held-out item at rank 0, another at rank 5, the third missed
        unseen = [i for i in range(1, 31) if i not in split.sequences[u, :7] and i not in held]
        top = [held[0]] + unseen[:4] + [held[1]] + unseen[4:]
        return np.array([top[:k]])

    recall = per_user_scores(rank_fn, split, "validation", "recall@20")
    ndcg = per_user_scores(rank_fn, split, "validation", "ndcg@20")
    assert recall == pytest.approx([2 / 3])
    assert ndcg == pytest.approx([(1 + 1 / np.log2(7)) / (1 + 1 / np.log2(3) + 1 / np.log2(4))])


def test_per_user_scores_of_some_rows_are_those_rows_of_all(small_data):
    split = build_split(small_data)
    rng = np.random.default_rng(0)

    def rank_fn(users, end, k):  # any fixed answer per user
        return np.stack([np.random.default_rng(int(u)).permutation(split.n_items)[:k] + 1 for u in users])

    everyone = per_user_scores(rank_fn, split, "validation")
    rows = np.sort(rng.permutation(len(everyone))[:7])
    assert per_user_scores(rank_fn, split, "validation", rows=rows) == pytest.approx(everyone[rows])


def test_the_ranker_validates_on_a_sample_of_users_or_all(small_data):
    split = build_split(small_data)
    validation_users = int((split.validation_len > 0).sum())
    for sample, expected in ((7, 7), (0, validation_users)):
        train = TrainConfig(epochs=1, min_epochs=1, ranker_epochs=1, seed=0, ranker_validation_users=sample)
        model = TwoStageRecommender(model_config("tiny"), train).fit(split, progress=False)
        assert model.history.ranker[0]["validation_users"] == expected


def test_final_fit_without_validation_runs_every_epoch_and_keeps_the_last(small_data):
    train, _ = random_user_split(small_data, seed=0)
    full = build_split(train, holdout=0, protocol="random")
    config = model_config("tiny")
    model = TwoStageRecommender(
        config, TrainConfig(epochs=3, min_epochs=3, ranker_epochs=1, batch_size=16, patience=1)
    ).fit(full, progress=False)
    assert len(model.history.retrieval) == 3 and model.best_epochs["retrieval"] == 3
    assert all(e["validation_recall@20"] is None for e in model.history.retrieval)
    assert model.use_ranker and model.validation_score is None  # served as the choosing fit decided

    chooser = TwoStageRecommender(
        config, replace(TrainConfig(), epochs=4, min_epochs=1, ranker_epochs=0, batch_size=16)
    ).fit(build_split(train, holdout=1, protocol="random"), progress=False)
    scores = [e["validation_recall@20"] for e in chooser.history.retrieval]
    assert chooser.best_epochs["retrieval"] == int(np.argmax(scores)) + 1
    assert chooser.validation_retrieval == pytest.approx(max(scores))


def test_compare_split_files_validates_like_the_test_and_fits_all_train_items(small_data, tmp_path):
    from predictor.models.compare import compare_split_files

    train, test = random_user_split(small_data, seed=0)
    paths = write_user_lines(train, tmp_path / "train.txt"), write_user_lines(test, tmp_path / "test.txt")
    config = model_config("tiny")
    report, model, full = compare_split_files(
        *map(str, paths),
        config,
        TrainConfig(epochs=2, min_epochs=1, ranker_epochs=1, batch_size=16),
        progress=False,
    )
    assert report["protocol"] == "random" and report["validation"]["metric"] == "recall@20"
    assert report["validation"]["share"] == pytest.approx(
        len(test.events) / (len(train.events) + len(test.events)), abs=1e-4
    )
    assert 1 <= report["two_stage"]["epochs"] <= 2
    assert (
        len(model.history.retrieval) == report["two_stage"]["epochs"]
    )  # the final fit ran the chosen epochs
    assert (full.train_len == full.lengths).all()  # ... on every train item
    assert full.lengths.sum() == len(load_any(paths[0]).events)
    for name in ("popularity", "implicit_als", "implicit_bpr", "two_stage"):
        assert (
            0 <= report["results"][name]["recall@20"] <= 1
            and report["results"][name]["users"] == report["users"]
        )


def test_set_examples_hold_out_a_share_of_each_user_and_read_the_rest(small_data):
    from predictor.models.training import TrainingBatches

    split = build_split(small_data, holdout=1, protocol="random")
    batches = TrainingBatches(split, max_history=12, user_features=None, device="cpu")
    users = np.flatnonzero(split.train_len >= 2)
    read, targets, dense, n_targets = batches.sets(split, users, share=0.25)
    assert dense.shape == (len(users), batches.dense_flat.shape[1])
    assert n_targets == int((targets > 0).sum())
    for row, u in enumerate(users):
        n = split.train_len[u]
        held = targets[row][targets[row] > 0].tolist()
        seen = read[row][read[row] > 0].tolist()
        assert len(held) == min(max(round(0.25 * n), 1), n - 1)  # the share, at least one, never all
        assert len(seen) == min(n - len(held), 12)  # the rest, up to max_history
        order = split.sequences[u, :n].tolist()
        # training positions only, in the epoch's order: the validation targets after them stay unseen
        assert held == order[: len(held)] and seen == order[len(held) : len(held) + len(seen)]


def test_the_set_encoder_reads_a_set_and_serves_what_it_trains():
    import torch

    from predictor.models.two_tower import TwoTower

    torch.manual_seed(0)
    config = model_config("tiny", user_encoder="set", max_history=6)
    tower = TwoTower(config, n_item_rows=30, n_categories=3, user_dense_dim=4, item_dense_dim=2).eval()
    cats, dense = torch.rand(30, 3), torch.rand(30, 2)
    cats[0], dense[0] = 0, 0
    window = torch.tensor([[5, 9, 2, 0, 0, 0], [7, 3, 11, 4, 8, 1]])
    lengths = torch.tensor([3, 6])
    udense = torch.rand(2, 4)
    table = tower.history_table(cats, dense)
    users = tower.user_embedding(window, lengths, udense, table)
    assert users.shape == (2, config.dim)
    torch.testing.assert_close(users.norm(dim=1), torch.ones(2))
    # the order of the items does not matter, and neither does what follows the last real one
    shuffled = torch.tensor([[2, 5, 9, 17, 23, 4], [1, 8, 4, 11, 3, 7]])
    torch.testing.assert_close(tower.user_embedding(shuffled, lengths, udense, table), users)
    # a different set does
    other = tower.user_embedding(
        torch.tensor([[5, 9, 3, 0, 0, 0], [7, 3, 11, 4, 8, 1]]), lengths, udense, table
    )
    assert not torch.allclose(other[0], users[0]) and torch.allclose(other[1], users[1])
    # training's forward computes the same states the inference path serves
    targets = torch.tensor([[6, 0], [12, 13]])
    states, positive, negatives = tower(window, udense, targets, torch.arange(1, 30), cats, dense)
    torch.testing.assert_close(states, users)
    torch.testing.assert_close(positive[1, 1], tower.item_embedding(torch.tensor(13), cats[13], dense[13]))
    assert negatives.shape == (29, config.dim)


def test_the_set_encoder_learns_held_out_items_and_keeps_the_averaged_weights(small_data, tmp_path):
    import torch

    from predictor.models.evaluate import Popularity, evaluate

    split = build_split(small_data, holdout=1, protocol="random")
    config = model_config("tiny", user_encoder="set", max_history=100, full_softmax_items=1_000)
    models = {}
    for decay in (0.0, 0.9):
        train = TrainConfig(
            epochs=12, min_epochs=12, ranker_epochs=0, batch_size=16, lr=5e-3, ema_decay=decay, seed=3
        )
        models[decay] = TwoStageRecommender(config, train).fit(split, progress=False)
    plain, averaged = models[0.0], models[0.9]
    # the same raw trajectory (the average draws no random numbers), a different set of kept weights
    assert [e["loss"] for e in plain.history.retrieval] == [e["loss"] for e in averaged.history.retrieval]
    kept = averaged.retrieval.parameters()
    assert any(not torch.equal(a.detach(), b.detach()) for a, b in zip(kept, plain.retrieval.parameters()))
    for model in (plain, averaged):
        # what was validated is what is kept: the best epoch's score, again, from the kept weights
        again = evaluate(model.rank(split, "retrieval", search="exact"), split, "validation")["recall@20"]
        assert again == pytest.approx(model.validation_retrieval, abs=1e-9)
    popularity = evaluate(Popularity().fit(split, "validation").rank(split), split, "validation")["recall@20"]
    assert averaged.validation_retrieval > popularity
    # the artifact holds the set encoder and its own id table: the loaded model recommends the same
    assert len(averaged.id_tables()) == 3
    loaded = TwoStageRecommender.load(averaged.save(str(tmp_path / "set-model")))
    assert loaded.config.user_encoder == "set"
    users = split.users.raw(np.arange(1, 6))
    for got, want in zip(loaded.recommend(users, 10, split), averaged.recommend(users, 10, split)):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_all_items_loss_by_hand():
    import torch

    from predictor.models.two_tower import all_items_softmax_loss

    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    positive = torch.tensor([[True, False, True], [False, False, False]])  # the second state has none
    excluded = torch.tensor([[False, True, False], [False, False, False]])
    loss = all_items_softmax_loss(user, items, torch.zeros(3), positive, excluded, temperature=0.5)
    l0, l2 = 1.0 / 0.5, 0.6 / 0.5  # item 1 is excluded from the first state's softmax
    log_z = np.log(np.exp(l0) + np.exp(l2))
    assert loss.item() == pytest.approx(-((l0 - log_z) + (l2 - log_z)) / 2, rel=1e-6)


def test_later_items_mark_what_each_state_has_not_read(small_data):
    import torch

    split = build_split(small_data, holdout=1, protocol="random", seed=0)
    users = np.flatnonzero(split.train_len > 12)[:3]
    window, _ = split.window(users, split.train_len[users], 10)  # the newest 10 training items
    position = later_items(split, users, torch.from_numpy(window))
    for row, u in enumerate(users):
        owned = set(split.sequences[u, : split.train_len[u]])
        assert set(np.flatnonzero(position[row].numpy() >= 0)) == owned  # the user's items, nothing else
        for t, item in enumerate(window[row]):
            assert position[row, item] == max(
                p for p, i in enumerate(window[row]) if i == item
            )  # the last read
        outside = owned - set(window[row])
        assert all(position[row, i] == 10 for i in outside)  # outside the window: after every position


def test_random_splits_choose_the_set_encoder_and_the_user_wins(small_data):
    from predictor.models.defaults import EXACT_SOFTMAX_SETTINGS, SET_ENCODER_SETTINGS, choose
    from predictor.models.windows import training_objective

    config, train, reasons = choose(1_682, 80_000, protocol="random")
    assert config.user_encoder == "set" and config.max_history == SET_ENCODER_SETTINGS["model"]["max_history"]
    assert (
        config.full_softmax_items >= 1_682 and train.ema_decay == SET_ENCODER_SETTINGS["train"]["ema_decay"]
    )
    assert train.batch_size == SET_ENCODER_SETTINGS["train"]["batch_size"]
    assert "random split" in reasons["user_encoder"] and "random split" in reasons["batch_size"]
    config, temporal, reasons = choose(1_682, 100_000)
    assert config.user_encoder == "sequence" and temporal.ema_decay == 0 and "user_encoder" not in reasons
    assert temporal.batch_size == EXACT_SOFTMAX_SETTINGS["train"]["batch_size"]
    assert "random split" not in reasons["batch_size"]
    _, sampled, reasons = choose(50_000, 100_000)  # no exact softmax: the model's own batch
    assert sampled.batch_size == TrainConfig().batch_size and "batch_size" not in reasons
    config, _, reasons = choose(50_000, 100_000, protocol="random")  # the set encoder, sampled
    assert config.user_encoder == "set" and config.full_softmax_items == 0
    config, mine, reasons = choose(
        1_682,
        80_000,
        model_options={"user_encoder": "sequence"},
        train_options={"batch_size": 16},
        protocol="random",
    )
    assert config.user_encoder == "sequence" and mine.batch_size == 16
    assert reasons["batch_size"] == reasons["user_encoder"] == "set by the user"
    with pytest.raises(ValueError, match="user_encoder must be one of sequence, set, got 'bag'"):
        model_config("tiny", user_encoder="bag")

    random_split = build_split(small_data, holdout=1, protocol="random")
    assert training_objective(TrainConfig(), random_split) == "all_items"
    assert training_objective(TrainConfig(), build_split(small_data)) == "next_item"
    assert training_objective(TrainConfig(objective="next_item"), random_split) == "next_item"
    with pytest.raises(
        ValueError, match="objective must be one of auto, next_item, all_items, got 'everything'"
    ):
        TrainConfig(objective="everything")
    with pytest.raises(ValueError, match="objective='next_item' needs user_encoder='sequence'"):
        TwoStageRecommender(
            model_config("tiny", user_encoder="set"), TrainConfig(objective="next_item", epochs=1)
        ).fit(random_split, progress=False)
