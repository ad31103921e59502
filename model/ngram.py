"""DeepSeek-OCR's no-repeat n-gram rule: the reference on a token list, and batched on tensors.

The batched form has static shapes and no host sync, so the decode graph applies it itself
(:class:`model.gpt.GraphedDecoder`); the engine uses it for rows with other settings.
"""

from __future__ import annotations

from typing import Sequence

import torch


def banned_ngram_tokens(tokens: Sequence[int], n: int, window: int) -> set[int]:
    """Tokens that would repeat an n-gram seen in the last ``window`` generated tokens.

    The same rule as DeepSeek-OCR's no-repeat logits processor: take the last n-1 tokens as a
    prefix, find that prefix among the n-grams that start inside the window, ban what followed.
    """
    if n <= 0 or len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - (n - 1):]) if n > 1 else ()
    start = max(0, len(tokens) - window)
    banned = set()
    for i in range(start, len(tokens) - n + 1):
        if tuple(tokens[i:i + n - 1]) == prefix:
            banned.add(tokens[i + n - 1])
    return banned


def block_ngrams(logits: torch.Tensor, history: torch.Tensor, n: int, whitelist: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """:func:`banned_ngram_tokens` for many rows at once: logits [r, V] with the banned tokens at -inf.

    ``history`` [r, W] holds each row's last W generated tokens (W = the window), right-aligned,
    -1 where the row has generated fewer. ``whitelist``: token ids never banned, either one id
    list for every row or a [r, V] boolean mask per row. ``rows`` [r] (boolean): only these rows
    are blocked. ``inplace``: write into ``logits`` (a decode graph's buffer) instead of a copy.
    """
    r, W = history.shape
    if n <= 0 or W < n:
        return logits
    grams = history.unfold(1, n, 1)  # [r, W-n+1, n]: every n-gram inside the window
    follow = grams[..., n - 1]
    match = (grams[..., :n - 1] == history[:, None, W - n + 1:]).all(-1) & (follow >= 0)
    if whitelist is not None and whitelist.dim() == 2:
        match &= ~whitelist.gather(1, follow.clamp(min=0))
    elif whitelist is not None and whitelist.numel():
        match &= ~torch.isin(follow, whitelist)
    if rows is not None:
        match &= rows[:, None]
    # +inf leaves a logit as it is under "amin"; filled on the device (a host scalar copied in
    # would be an illegal host-to-device copy inside a CUDA graph capture)
    src = torch.full(follow.shape, float("inf"), device=logits.device, dtype=logits.dtype)
    scatter = logits.scatter_reduce_ if inplace else logits.scatter_reduce
    return scatter(1, follow.clamp(min=0), src.masked_fill_(match, float("-inf")), "amin")


def shift_in(history: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``history`` [r, W] with ``tokens`` [r] appended at the right end (the oldest drops out)."""
    return torch.cat([history[:, 1:], tokens[:, None]], 1)


def push_tokens(history: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor) -> None:
    """:func:`shift_in` in place, for ``rows`` [r] (boolean) only: static shapes, for a decode graph."""
    history.copy_(torch.where(rows[:, None], shift_in(history, tokens), history))
