"""Caption retrieval (aion_train/eval/multimodal.py): recall@k from ranks worked out by hand,
ties counted as misses (collapsed embeddings score 0, not 1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aion_train.eval.multimodal import caption_retrieval, true_ranks


class TableModel(nn.Module):
    """Caption i (token id i + 1) embeds as row i of `text`; an image's patches [P, 2] embed
    as their mean: the retrieval sees exactly the vectors a test writes down."""

    def __init__(self, text: list[list[float]]):
        super().__init__()
        self.mm = SimpleNamespace(pad_id=0)
        self.text = nn.Parameter(torch.tensor([[0.0, 0.0]] + text))

    def encode_text(self, ids):
        return self.text[ids[:, 0]]

    def encode_image(self, patches):
        return patches.mean(1)


def _tok(captions):
    order = sorted(captions)
    return SimpleNamespace(encode=lambda c: [order.index(c) + 1])


def test_recall_counts_ties_as_misses_by_hand():
    # sorted captions a, b, c embed as (1, 0), (0, 1), (-1, 0)
    model = TableModel([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    pairs = [
        ("a", (1.0, 0.5)),  # cos a .894 > b .447 > c: rank 0
        ("b", (1.0, 0.2)),  # a .981 > b .196: rank 1
        ("a", (1.0, 1.0)),  # a = b = .707 (tie for first): rank 1
        ("c", (0.0, 1.0)),
    ]  # b 1 > a = c = 0 (tie): rank 2
    pairs = [{"caption": c, "image": torch.tensor([v])} for c, v in pairs]
    r = caption_retrieval(model, _tok("abc"), pairs)
    assert r["recall_at_1"] == 0.25 and r["recall_at_5"] == 1.0
    assert r["n"] == 4 and r["n_captions"] == 3 and r["chance_at_1"] == pytest.approx(1 / 3)
    sims = torch.tensor([[0.9, 0.4, -0.9], [0.98, 0.2, 0.0], [0.7, 0.7, -0.7], [0.0, 1.0, 0.0]])
    assert true_ranks(sims, torch.tensor([0, 1, 0, 2])).tolist() == [0, 1, 1, 2]


def test_collapsed_embeddings_score_zero_not_one():
    captions = "abcdefgh"
    model = TableModel([[0.6, 0.8]] * len(captions))  # every caption the same vector
    pairs = [{"caption": c, "image": torch.tensor([[0.6, 0.8]])} for c in captions]
    r = caption_retrieval(model, _tok(captions), pairs)
    assert r["recall_at_1"] == 0.0 and r["recall_at_5"] == 0.0  # below chance (1/8, 5/8)
    assert r["chance_at_1"] == 1 / 8 and r["chance_at_5"] == 5 / 8
