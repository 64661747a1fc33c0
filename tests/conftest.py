"""Shared fixtures: the real default model folder (fetched once, then cached) and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ragkv.config import default_home
from ragkv.model_fetch import ensure_default_model


@pytest.fixture(scope="session")
def smol_path() -> Path:
    return ensure_default_model(default_home(), progress=False)


@pytest.fixture(scope="session")
def tokenizer(smol_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_path))
