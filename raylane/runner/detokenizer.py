"""Incremental detokenization: turn a growing list of token ids into text without re-decoding it all."""

from __future__ import annotations

from raylane.models import Tokenizer

# Tokens decoded together with the new ones so that merges and leading spaces come out right.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Appends the text of new tokens, holding back bytes that do not yet form a whole character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def update(self, token_ids: list[int]) -> str:
        """Decode up to the end of ``token_ids`` (the output so far); returns the full text."""
        if self.read_offset >= len(token_ids):
            return self.text
        prefix = self.tokenizer.decode(token_ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(token_ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) < len(prefix):
            return self.text  # an incomplete UTF-8 character: wait for the next token
        self.text += full[len(prefix) :]
        self.read_offset = len(token_ids)
        self.prefix_offset = max(0, self.read_offset - _CONTEXT_TOKENS)
        return self.text
