"""A byte-level tokenizer for the tiny checkpoints: token i is byte i, the special
tokens follow; made with `tokenizers`, nothing from a hub."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def byte_level_tokenizer(special_tokens: list[str]) -> Tokenizer:
    """A BPE tokenizer without merges: token i is byte i; `special_tokens` follow,
    each one added token."""
    vocab = byte_symbols()
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special_tokens)
    return tokenizer


def byte_symbols() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (the ByteLevel alphabet)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = {chr(b): b for b in kept}
    shifted = (b for b in range(256) if b not in kept)
    for i, b in enumerate(shifted):
        symbols[chr(256 + i)] = b
    return symbols
