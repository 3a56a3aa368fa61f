"""The tiny Gemma4 checkpoint's tokenizer on its own, for vLLM's Gemma4ToolParser.

Byte level with Gemma4's special tokens (tiny_gemma4.SPECIAL_TOKENS), so that
`<|tool_call>`, `<tool_call|>` and the string delimiter `<|"|>` are one token each,
as in Gemma4's own tokenizer; made with `tokenizers`, nothing from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from byte_tokenizer import byte_level_tokenizer
from tiny_gemma4 import SPECIAL_TOKENS, STRING_DELIM, TOOL_CALL_END, TOOL_CALL_START

__all__ = ["STRING_DELIM", "tool_call", "write_tokenizer"]


def write_tokenizer(directory: Path) -> Path:
    """A PreTrainedTokenizerFast in `directory` (vLLM's get_tokenizer loads it)."""
    directory.mkdir(parents=True, exist_ok=True)
    byte_level_tokenizer(SPECIAL_TOKENS).save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def tool_call(name: str, body: str) -> str:
    """Gemma4's text of one tool call whose arguments are `body` (Gemma4 notation)."""
    return f"{TOOL_CALL_START}call:{name}{{{body}}}{TOOL_CALL_END}"
