"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and prefix caching.

A block is registered in the prefix cache (by a hash chained over all tokens up to and including
it) only once its KV has been computed, so a sequence never reuses a block that is still being
filled. Freed blocks keep their hash and stay reusable until they are handed out again, oldest
first (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from raylane.runner.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hashes(token_ids: list[int], block_size: int, num_blocks: int) -> list[int]:
    """Hash of each of the first ``num_blocks`` full blocks, each chained on its predecessor."""
    hashes, parent = [], None
    for i in range(num_blocks):
        parent = hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class BlockManager:
    """Hands out KV blocks to sequences and shares computed prompt blocks between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        # Hashes of full blocks some sequence is computing right now, so identical prompts wait for them.
        self.pending: dict[int, int] = {}
        self.seq_hashes: dict[int, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _cacheable_hashes(self, seq: Sequence) -> list[int]:
        # The last token is never served from cache: its logits are needed to sample.
        num_full = (len(seq) - 1) // self.block_size
        return chain_hashes(seq.token_ids, self.block_size, num_full)

    def _lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None or self.blocks[block_id].token_ids != token_ids:
            return None
        return block_id

    def _uses_cache(self, seq: Sequence) -> bool:
        # Prompt log-probs need logits at every prompt position, so nothing may be skipped.
        return self.enable_prefix_caching and not seq.params.prompt_logprobs and seq.cache_blocks

    def should_wait_for_prefix(self, seq: Sequence) -> bool:
        """True when the next block this sequence would compute is being computed by another one."""
        if not self._uses_cache(seq):
            return False
        bs = self.block_size
        for i, block_hash in enumerate(self._cacheable_hashes(seq)):
            if self._lookup(block_hash, tuple(seq.token_ids[i * bs : (i + 1) * bs])) is None:
                return block_hash in self.pending
        return False

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks of the sequence's longest computed prefix; return tokens covered."""
        assert not seq.block_table, "sequence already holds blocks"
        # Starting from no blocks, everything this sequence computes uses the current weights.
        seq.cache_blocks = True
        if not self._uses_cache(seq):
            return 0
        bs = self.block_size
        hashes = self._cacheable_hashes(seq)
        for i, block_hash in enumerate(hashes):
            block_id = self._lookup(block_hash, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        num_cached = len(seq.block_table)
        seq.num_registered_blocks = num_cached
        self.seq_hashes[seq.seq_id] = hashes[:num_cached]
        for block_hash in hashes[num_cached:]:
            self.pending.setdefault(block_hash, seq.seq_id)
        return num_cached * bs

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the sequence's block table to hold ``num_tokens`` tokens; False if blocks run out."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free_blocks):
            return False
        for _ in range(needed):
            block_id, _ = self.free_blocks.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None and self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)
        return True

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed blocks to the prefix cache."""
        if not self._uses_cache(seq):
            return
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        while seq.num_registered_blocks < num_full:
            i = seq.num_registered_blocks
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block_hash = hash((hashes[-1] if hashes else None, tokens))
            hashes.append(block_hash)
            if self.pending.get(block_hash) == seq.seq_id:
                del self.pending[block_hash]
            if block_hash not in self.hash_to_block:
                block = self.blocks[seq.block_table[i]]
                block.block_hash, block.token_ids = block_hash, tokens
                self.hash_to_block[block_hash] = block.block_id
            seq.num_registered_blocks += 1

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; the last blocks of a sequence are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_registered_blocks = 0
        self.seq_hashes.pop(seq.seq_id, None)
        for block_hash in [h for h, owner in self.pending.items() if owner == seq.seq_id]:
            del self.pending[block_hash]

    def reset_prefix_cache(self, live: list[Sequence]) -> None:
        """Forget every cached block, e.g. because the weights that computed them changed.

        The ``live`` sequences hold KV from the old weights, so their later blocks are not cached either.
        """
        for seq in live:
            seq.cache_blocks = False
            self.seq_hashes.pop(seq.seq_id, None)
        # A block holds a hash exactly while hash_to_block maps that hash to it, so this touches the
        # cached blocks only, not the whole pool (hundreds of thousands of blocks on a large GPU).
        for block_id in self.hash_to_block.values():
            self.blocks[block_id].block_hash, self.blocks[block_id].token_ids = None, ()
        self.hash_to_block.clear()
        self.pending.clear()
