"""pytest fixtures of the tool-parser tests, loaded with `pytest_plugins`: the local
Gemma4 tokenizer and one parser worker per variant."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gemma4_tokenizer import write_tokenizer
from parser_variants import ParserWorker

pytest_plugins = ["moe_fixtures"]  # the `variant` fixture: pristine, patched, plugin


@pytest.fixture(scope="session")
def gemma4_tokenizer(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("gemma4-tokenizer"))


@pytest.fixture(scope="module")
def parser(variant, gemma4_tokenizer, tmp_path_factory) -> Iterator[ParserWorker]:
    log = tmp_path_factory.mktemp("parser") / f"{variant.name}.log"
    worker = ParserWorker(variant.name, variant.fixes, gemma4_tokenizer, log)
    yield worker
    worker.close()
