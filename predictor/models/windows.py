"""Training examples cut from a split: single labels (the ranker), windows of up to ``max_history``
labels (retrieval), each epoch's item order on random splits, and the objective they train.

Shapes: U = users of the split, W = windows, E = labelled positions; indexes are int64.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from predictor.models.config import TrainConfig
from predictor.models.data import SplitData


def training_objective(train: TrainConfig, split: SplitData) -> str:
    """``train.objective``, with "auto" resolved from how the split's validation was drawn: "next_item"
    (each state predicts the item that follows it) on temporal splits, "all_items" (each state predicts
    every item of the user it has not read yet) on random ones, whose held-out items are any of the
    user's, not the next ones."""
    if train.objective != "auto":
        return train.objective
    return "all_items" if split.protocol == "random" else "next_item"


def training_examples(split: SplitData) -> tuple[np.ndarray, np.ndarray]:
    """(user index, position) of every training label that has at least one earlier item."""
    counts = np.clip(split.train_len - 1, 0, None)
    users = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    positions = np.arange(counts.sum()) - np.repeat(starts, counts) + 1
    return users.astype(np.int64), positions.astype(np.int64)


def shuffled_training_items(split: SplitData, rng: np.random.Generator) -> SplitData:
    """A copy of ``split`` whose users' training items (positions ``< train_len``) are in a fresh random
    order; held-out positions keep theirs. For random splits, where the order carries nothing."""
    n_rows, width = split.sequences.shape
    columns = np.arange(width)[None, :]
    # sort keys: a random draw in [0, 1) for training positions, the position itself (>= 1) after them
    keys = np.where(columns < split.train_len[:, None], rng.random((n_rows, width)), columns + 1.0)
    order = np.argsort(keys, axis=1, kind="stable")
    return dataclasses.replace(
        split,
        sequences=np.take_along_axis(split.sequences, order, axis=1),
        timestamps=np.take_along_axis(split.timestamps, order, axis=1),
    )


def training_windows(
    split: SplitData, max_len: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(user index, end) of each training window: chunks of up to ``max_len`` labels cut from the end of
    every user's training events; labels are positions ``[max(end - max_len, 1), end)``.

    With ``rng``, the chunks below the newest one are cut at a random shift in ``[0, max_len)`` per user:
    every label is still covered (the newest window overlaps the next one by the shift), but which
    labels start a window, with no context, changes from epoch to epoch.
    """
    labels = np.clip(split.train_len - 1, 0, None)
    shift = np.zeros_like(labels) if rng is None else rng.integers(0, max_len, len(labels))
    # newest window ends at train_len; the rest tile the labels that remain below train_len - max_len + shift
    rest = np.clip(labels - max_len + shift, 0, None) * (labels > max_len)
    chunks = np.where(labels > 0, 1 + np.ceil(rest / max_len).astype(np.int64), 0)
    users = np.repeat(np.arange(len(chunks)), chunks)
    first = np.cumsum(chunks) - chunks
    k = np.arange(chunks.sum()) - np.repeat(first, chunks)
    top = split.train_len[users]
    ends = np.where(k == 0, top, top - max_len + shift[users] - (k - 1) * max_len)
    return users.astype(np.int64), ends.astype(np.int64)


def pack_windows(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows for a step's windows of ``lengths`` ``[B]`` tokens each (1 to ``capacity``), several short
    windows to a row of ``capacity`` tokens, so the encoder computes on labels instead of padding:
    (row ``[B]``, offset of the window's first token in its row ``[B]``, number of rows).

    First-fit decreasing (the bin-packing heuristic): the longest windows are placed first, each in the
    first row with room for it. A full window takes a row of its own; only rows with room are scanned.
    """
    row = np.empty(len(lengths), np.int64)
    offset = np.empty(len(lengths), np.int64)
    n_rows = 0
    open_rows: list[list[int]] = []  # [row, free tokens] of the rows with room left
    for w in np.argsort(-lengths, kind="stable"):
        n = int(lengths[w])
        slot = next((s for s in open_rows if s[1] >= n), None)
        if slot is None:
            slot = [n_rows, capacity]
            n_rows += 1
            open_rows.append(slot)
        row[w], offset[w] = slot[0], capacity - slot[1]
        slot[1] -= n
        if slot[1] == 0:
            open_rows.remove(slot)
    return row, offset, n_rows
