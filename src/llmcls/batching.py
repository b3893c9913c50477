"""Token-budget micro-batches (``train.batch_tokens``): instead of a fixed row count, each micro-batch takes rows
in the epoch's order (shuffled, or length-grouped with ``train.group_by_length``; seeded by ``train.seed`` and the
epoch) while their real tokens stay within the budget. A row longer than the budget is a batch of its own.

The HF Trainer sizes an epoch once, from ``len(dataloader)``, so every epoch must yield the same number of
micro-batches. Greedy batches of a new order can number a few more or fewer; the sampler takes the largest count
over the epochs the run covers and, in an epoch that came out with fewer, splits its batches of the most rows in
two (smaller batches stay within the budget) until the counts match. Every row appears exactly once per epoch.

One process only: under DDP accelerate's ``BatchSamplerShard`` deals whole batches out round robin, so ranks would
get batches of different token counts and rows repeated to even them out; ``config.check_launch`` refuses it."""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


def greedy_batches(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Rows in ``order``, cut into batches whose lengths sum to at most ``budget`` (a longer row: alone)."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        n = lengths[i]
        if cur and total + n > budget:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        out.append(cur)
    return out


def split_to(batches: list[list[int]], count: int) -> list[list[int]]:
    """Split the batches of the most rows in two, in place of themselves, until there are ``count`` of them."""
    batches = list(batches)
    while len(batches) < count:
        k = max(range(len(batches)), key=lambda j: len(batches[j]))
        b = batches[k]
        if len(b) < 2:
            raise ValueError(f"cannot make {count} batches of {sum(map(len, batches))} rows")
        batches[k:k + 1] = [b[:len(b) // 2], b[len(b) // 2:]]
    return batches


class TokenBudgetSampler(Sampler[list[int]]):
    """A batch sampler (``DataLoader(batch_sampler=...)``) of token-budget micro-batches; see the module's doc.

    ``epochs`` and ``max_steps`` / ``grad_accum`` say how many epochs the run covers, over which the per-epoch
    batch count is made equal (``max_steps`` > 0: enough epochs for that many optimizer steps)."""

    def __init__(self, lengths: Sequence[int], budget: int, seed: int, group_by_length: bool = False,
                 epochs: float = 1.0, max_steps: int = -1, grad_accum: int = 1):
        if budget < 1:
            raise ValueError(f"batch_tokens={budget}: 1 or more")
        self.lengths = [int(n) for n in lengths]
        self.budget, self.seed, self.group_by_length = budget, seed, group_by_length
        self.epoch = 0
        self._counts: list[int] = []
        # enough epochs for the run; a count that grows lowers the epochs max_steps needs, so this ends
        while True:
            self._counts.append(len(self._greedy(len(self._counts))))
            n = max(self._counts)
            need = math.ceil(max_steps * grad_accum / n) if max_steps > 0 else math.ceil(epochs)
            if len(self._counts) >= max(need, 1):
                break
        self.count = max(self._counts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        if not self.group_by_length:
            return torch.randperm(len(self.lengths), generator=g).tolist()
        mean = max(1, sum(self.lengths) // max(1, len(self.lengths)))
        rows = max(1, self.budget // mean)  # rows per micro-batch, about; groups as the Trainer's sampler does
        return list(get_length_grouped_indices(self.lengths, rows, generator=g))

    def _greedy(self, epoch: int) -> list[list[int]]:
        return greedy_batches(self._order(epoch), self.lengths, self.budget)

    def batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """The micro-batches of an epoch (default: the current one), as many as every other epoch's."""
        b = self._greedy(self.epoch if epoch is None else epoch)
        if len(b) > self.count:  # past the epochs planned for (a resumed run asking for more): keep the count
            raise RuntimeError(f"epoch {epoch}: {len(b)} token-budget batches, more than the {self.count} planned")
        return split_to(b, self.count)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return self.count

