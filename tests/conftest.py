"""Shared pytest fixtures."""

import pathlib

import pytest

from vlm import tiny


@pytest.fixture(scope="session")
def tiny_dir() -> pathlib.Path:
    """The cached tiny random Qwen3-VL checkpoint (untied lm_head), built on first use."""
    return tiny.tiny_path()


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny checkpoint with tied word embeddings, built for this session."""
    return tiny.build_tiny(tmp_path_factory.mktemp("tiny-tied"), tie_word_embeddings=True)
