"""The no-repeat n-gram rule: the batched tensor form against the reference on token lists."""

import random

import pytest
import torch

from model.ngram import banned_ngram_tokens, block_ngrams, push_tokens


def _history(seq: list[int], window: int) -> list[int]:
    """The last ``window`` tokens, right-aligned, -1 before the first."""
    tail = seq[-window:]
    return [-1] * (window - len(tail)) + tail


@pytest.mark.parametrize("n, window", [(1, 6), (2, 5), (3, 8), (4, 20), (3, 3)])
def test_block_ngrams_bans_what_the_reference_bans(n, window):
    rng = random.Random(n * 100 + window)
    V = 6  # a small vocabulary repeats often
    seqs = [[rng.randrange(V) for _ in range(length)] for length in (0, 1, n - 1, n, 7, 15, 30) if length >= 0]
    history = torch.tensor([_history(s, window) for s in seqs])
    logits = torch.randn(len(seqs), V)
    blocked = block_ngrams(logits, history, n)
    for i, seq in enumerate(seqs):
        want = banned_ngram_tokens(seq, n, window)
        assert {v for v in range(V) if blocked[i, v] == float("-inf")} == want, (seq, n, window)
        kept = [v for v in range(V) if v not in want]
        assert torch.equal(blocked[i, kept], logits[i, kept])  # the rest untouched


def test_whitelists_and_row_selection():
    seq = [1, 2, 3, 1, 2, 4, 1, 2]  # "1 2" was followed by 3 and 4
    history = torch.tensor([_history(seq, 10)] * 3)
    logits = torch.zeros(3, 6)
    assert banned_ngram_tokens(seq, 3, 10) == {3, 4}
    shared = block_ngrams(logits, history, 3, whitelist=torch.tensor([4]))
    assert (shared == float("-inf")).nonzero()[:, 1].tolist() == [3, 3, 3]
    per_row = torch.zeros(3, 6, dtype=torch.bool)
    per_row[1, 3] = True
    masked = block_ngrams(logits, history, 3, whitelist=per_row, rows=torch.tensor([True, True, False]))
    assert [sorted(torch.nonzero(masked[r] == float("-inf")).flatten().tolist()) for r in range(3)] == [[3, 4], [4], []]


def test_push_tokens_shifts_only_the_selected_rows():
    history = torch.tensor([[-1, -1, 5], [7, 8, 9]])
    push_tokens(history, torch.tensor([6, 1]), torch.tensor([True, False]))
    assert history.tolist() == [[-1, 5, 6], [7, 8, 9]]
