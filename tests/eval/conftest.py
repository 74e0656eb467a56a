from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.helpers import train_tiny, write_data


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("trained-tiny"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("tiny-data"))
