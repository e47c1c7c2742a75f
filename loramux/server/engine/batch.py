"""A step's work as the model runner takes it: chunks of sequences, and those chunks flattened into one batch of
tokens on the host (ids, positions, KV cache indices, adapter slots), sorted by how their attention runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Chunk:
    """A piece of one sequence computed in a step."""

    token_ids: list[int]  # the tokens computed now
    start: int  # position of the first of them (= tokens already in the KV cache)
    block_table: list[int]  # blocks covering positions 0 .. start + len(token_ids) - 1
    slot: int = -1  # adapter slot, -1 = base model only
    all_logits: bool = False  # logits for every token of the chunk, not just the last


def block_table_rows(tables: list[list[int]], width: int, pad: int | None = None, rows: int = 0) -> torch.Tensor:
    """Block tables as a `(max(rows, len(tables)), width)` long tensor, each cut or padded to `width`: padded with
    `pad`, or with the table's own first block where `pad` is None; rows past the tables hold `pad` only. One tensor
    from one list (a `torch.tensor` per row cost ~4 ms of host time for 256 sequences on a 2-core VM)."""
    out = []
    for table in tables:
        row = table[:width]
        if len(row) < width:
            row = row + [row[0] if pad is None else pad] * (width - len(row))
        out.append(row)
    if rows > len(out):
        if pad is None:
            raise ValueError("padding rows need a pad block")
        out += [[pad] * width] * (rows - len(out))
    return torch.tensor(out, dtype=torch.long).reshape(len(out), width)


@dataclass
class FlatBatch:
    """The chunks of one forward pass as a flat batch of T tokens, on the host.

    Attention runs by kind of chunk: `decode` (one token: batched through the block tables), `fresh` (a prompt's
    first chunk, all of its context in this step: one padded causal call for all of them) and `others` (chunks that
    continue a prompt, and first chunks too short to pad to the longest: attended one sequence at a time)."""

    ids: list[int]  # (T,) token ids
    positions: list[int]  # (T,)
    slots: list[int]  # (T,) adapter slot of each token, -1 = base only
    kv_index: torch.Tensor  # (T,) long: flat cache index (block * block_size + offset) where each token's K/V goes
    ranges: list[tuple[int, int]]  # per chunk, [start, end) of its tokens in the flat batch
    contexts: dict[int, torch.Tensor]  # chunk (of 2+ tokens) -> flat cache index of its positions 0 .. end - 1
    decode: list[int]
    fresh: list[int]
    others: list[int]

    @classmethod
    def of(cls, chunks: list[Chunk], block_size: int) -> FlatBatch:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        kv_index: list[torch.Tensor] = []
        singles: list[int] = []  # decode tokens' cache indices not yet in kv_index (one tensor for a run of them)
        ranges: list[tuple[int, int]] = []
        contexts: dict[int, torch.Tensor] = {}
        bs = block_size
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            ranges.append((len(ids), len(ids) + n))
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + n))
            slots.extend([chunk.slot] * n)
            if n == 1:  # a decode token: only its own cache slot; attention reads the block table
                position = chunk.start
                singles.append(chunk.block_table[position // bs] * bs + position % bs)
            else:
                if singles:
                    kv_index.append(torch.tensor(singles, dtype=torch.long))
                    singles = []
                table = torch.tensor(chunk.block_table, dtype=torch.long)
                contexts[i] = (table[:, None] * bs + torch.arange(bs)).flatten()[: chunk.start + n]
                kv_index.append(contexts[i][chunk.start :])
        if singles:
            kv_index.append(torch.tensor(singles, dtype=torch.long))
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        fresh = [i for i, c in enumerate(chunks) if c.start == 0 and len(c.token_ids) > 1]
        longest = max((len(chunks[i].token_ids) for i in fresh), default=0)
        fresh = [i for i in fresh if 2 * len(chunks[i].token_ids) >= longest]  # padding at most doubles the work
        batched = set(decode) | set(fresh)
        others = [i for i in range(len(chunks)) if i not in batched]
        return cls(ids, positions, slots, torch.cat(kv_index), ranges, contexts, decode, fresh, others)

    def decode_inputs(self, chunks: list[Chunk], block_size: int, width_multiple: int = 1) -> dict[str, torch.Tensor]:
        """What the attention of the decode tokens reads: their rows in the batch (D,), their block tables cut to the
        widest one needed, rounded up to a multiple of `width_multiple` (D, width), and their context lengths (D,);
        nothing without decode tokens."""
        if not self.decode:
            return {}
        width = max(chunks[i].start // block_size + 1 for i in self.decode)
        width = -(-width // width_multiple) * width_multiple
        return {
            "decode_rows": torch.tensor([self.ranges[i][0] for i in self.decode], dtype=torch.long),
            "block_tables": block_table_rows([chunks[i].block_table for i in self.decode], width),
            "context_lens": torch.tensor([chunks[i].start + 1 for i in self.decode], dtype=torch.long),
        }

    def sampled_rows(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[int]]:
        """The rows of the batch whose logits are wanted, chunk after chunk (every row of a chunk with `all_logits`,
        else its last), as one tensor, and how many of them are each chunk's."""
        rows: list[int] = []
        counts: list[int] = []
        for chunk, (start, end) in zip(chunks, self.ranges, strict=True):
            if chunk.all_logits:
                rows.extend(range(start, end))
                counts.append(end - start)
            else:
                rows.append(end - 1)
                counts.append(1)
        return torch.tensor(rows, dtype=torch.long), counts
