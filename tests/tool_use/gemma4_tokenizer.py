"""A local tokenizer with Gemma4's tool-call special tokens, for vLLM's Gemma4ToolParser.

Byte level (token i is byte i) with Gemma4's tool tokens added as special tokens,
so `<|tool_call>`, `<tool_call|>` and the string delimiter `<|"|>` are one token
each, as in Gemma4's own tokenizer; made with `tokenizers`, nothing from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TOOL_CALL_START, TOOL_CALL_END, STRING_DELIM = "<|tool_call>", "<tool_call|>", '<|"|>'
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", TOOL_CALL_START, TOOL_CALL_END, STRING_DELIM]


def byte_symbols() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (the ByteLevel alphabet)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = {chr(b): b for b in kept}
    shifted = (b for b in range(256) if b not in kept)
    for i, b in enumerate(shifted):
        symbols[chr(256 + i)] = b
    return symbols


def write_tokenizer(directory: Path) -> Path:
    """A PreTrainedTokenizerFast in `directory` (vLLM's get_tokenizer loads it)."""
    tokenizer = Tokenizer(models.BPE(vocab=byte_symbols(), merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def tool_call(name: str, body: str) -> str:
    """Gemma4's text of one tool call whose arguments are `body` (Gemma4 notation)."""
    return f"{TOOL_CALL_START}call:{name}{{{body}}}{TOOL_CALL_END}"
