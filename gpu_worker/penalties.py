"""Presence, frequency and repetition penalties need each sequence's history. The table
keeps it on the device, one row per penalized sequence: how often each token occurs in
its output, and whether it occurs in its prompt. Rows are filled from the token list a
new sequence arrives with and then counted up from the sampled tokens while they are
still on the device, so that a step launched before the previous one's tokens are read
(overlap) still sees them. Only sequences that use a penalty take a row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpu_worker.sampler import SequenceSampling, to_device

NO_ROW = -1


class PenaltyTable:
    def __init__(self, vocab_size: int, device: torch.device, capacity: int = 8) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._counts = torch.zeros(capacity, vocab_size, dtype=torch.int32, device=device)
        self._in_prompt = torch.zeros(capacity, vocab_size, dtype=torch.bool, device=device)
        self._free = list(range(capacity))
        self._row_of: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self._row_of)

    def add(self, seq_id: int, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        row = self._row_of.get(seq_id)
        if row is None:
            row = self._row_of[seq_id] = self._take_row()
        self._counts[row].zero_()
        self._in_prompt[row].zero_()
        prompt, output = token_ids[:num_prompt_tokens], token_ids[num_prompt_tokens:]
        if prompt:
            self._in_prompt[row, to_device(prompt, torch.int64, self.device)] = True
        if output:
            ids = to_device(output, torch.int64, self.device)
            self._counts[row].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def remove(self, seq_id: int) -> None:
        row = self._row_of.pop(seq_id, None)
        if row is not None:
            self._free.append(row)

    def clear(self) -> None:
        self._free.extend(self._row_of.values())
        self._row_of.clear()

    def rows(self, seq_ids: Sequence[int]) -> list[int]:
        return [self._row_of.get(seq_id, NO_ROW) for seq_id in seq_ids]

    def count(self, rows: Sequence[int], tokens: torch.Tensor) -> None:
        """Counts tokens[i] into rows[i] (NO_ROW: not penalized), on the device."""
        picked = [i for i, row in enumerate(rows) if row != NO_ROW]
        if not picked:
            return
        index = to_device(picked, torch.int64, self.device)
        table_rows = to_device([rows[i] for i in picked], torch.int64, self.device)
        ones = torch.ones(len(picked), dtype=torch.int32, device=self.device)
        self._counts.index_put_((table_rows, tokens[index]), ones, accumulate=True)

    def apply(
        self, logits: torch.Tensor, samplings: Sequence[SequenceSampling], rows: Sequence[int]
    ) -> torch.Tensor:
        """The logits with each penalized row's penalties applied (float32), in one
        batched pass; the logits themselves when no row is penalized."""
        picked = [i for i, row in enumerate(rows) if row != NO_ROW]
        if not picked:
            return logits

        def column(values: Sequence[float | int], dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, logits.device)

        index = column(picked, torch.int64)
        table_rows = column([rows[i] for i in picked], torch.int64)
        counts = self._counts[table_rows]
        penalized = logits[index].float()
        repetition = column([samplings[i].repetition_penalty for i in picked], torch.float32)[:, None]
        seen = (counts > 0) | self._in_prompt[table_rows]
        repeated = torch.where(penalized > 0, penalized / repetition, penalized * repetition)
        penalized = torch.where(seen, repeated, penalized)
        frequency = column([samplings[i].frequency_penalty for i in picked], torch.float32)[:, None]
        presence = column([samplings[i].presence_penalty for i in picked], torch.float32)[:, None]
        penalized -= frequency * counts + presence * (counts > 0)
        result = logits.to(torch.float32, copy=True)
        result[index] = penalized
        return result

    def _take_row(self) -> int:
        if not self._free:
            capacity = self._counts.shape[0]
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
            self._in_prompt = torch.cat([self._in_prompt, torch.zeros_like(self._in_prompt)])
            self._free = list(range(capacity, 2 * capacity))
        return self._free.pop()
