"""Chunks flattened into one batch of tokens: cache indices through the block tables, chunks sorted by how their
attention runs, the rows that are sampled."""

from __future__ import annotations

import pytest

from loramux.server.engine.batch import Chunk, FlatBatch, block_table_rows


def test_block_tables_are_cut_or_padded_to_one_width():
    tables = [[7, 8, 9], [4], [1, 2]]
    assert block_table_rows(tables, 2).tolist() == [[7, 8], [4, 4], [1, 2]]  # padded with each table's first block
    assert block_table_rows(tables, 3, pad=0, rows=5).tolist() == [[7, 8, 9], [4, 0, 0], [1, 2, 0], [0] * 3, [0] * 3]
    with pytest.raises(ValueError, match="pad block"):
        block_table_rows(tables, 2, rows=4)


def test_a_mixed_step_is_flattened_and_each_chunk_attends_by_its_kind():
    chunks = [
        Chunk([11, 12, 13, 14, 15], 0, [3, 1], slot=2),  # a fresh prompt over two blocks (of 4)
        Chunk([21], 6, [5, 0], slot=-1),  # a decode token at position 6: block 0, offset 2
        Chunk([31, 32], 0, [7], all_logits=True),  # a fresh prompt less than half the longest: attended on its own
        Chunk([41, 42, 43], 2, [2, 6]),  # a prompt that goes on from position 2
    ]
    flat = FlatBatch.of(chunks, block_size=4)
    assert flat.ids == [11, 12, 13, 14, 15, 21, 31, 32, 41, 42, 43]
    assert flat.positions == [0, 1, 2, 3, 4, 6, 0, 1, 2, 3, 4]
    assert flat.slots == [2] * 5 + [-1] * 6
    assert flat.kv_index.tolist() == [12, 13, 14, 15, 4, 2, 28, 29, 10, 11, 24]
    assert flat.ranges == [(0, 5), (5, 6), (6, 8), (8, 11)]
    assert (flat.decode, flat.fresh, flat.others) == ([1], [0], [2, 3])
    assert flat.contexts[3].tolist() == [8, 9, 10, 11, 24]  # its whole context, the two earlier tokens included
    decode = flat.decode_inputs(chunks, block_size=4)
    assert decode["decode_rows"].tolist() == [5] and decode["context_lens"].tolist() == [7]
    assert decode["block_tables"].tolist() == [[5, 0]]
    wide = flat.decode_inputs(chunks, block_size=4, width_multiple=16)["block_tables"]  # as on a GPU
    assert wide.tolist() == [[5, 0] + [5] * 14]  # padded with the table's own first block
    rows, counts = flat.sampled_rows(chunks)
    assert rows.tolist() == [4, 5, 6, 7, 10] and counts == [1, 1, 2, 1]  # the all_logits chunk: both its rows
    assert FlatBatch.of(chunks[:1], block_size=4).decode_inputs(chunks[:1], block_size=4) == {}
