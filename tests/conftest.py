"""Shared fixtures: the real tiny model and data from ../shared (paths via the same config defaults)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS_DIR = Path(os.environ.get("OMNIQ_MODELS_DIR", SHARED / "models"))
DATA_DIR = Path(os.environ.get("OMNIQ_DATA_DIR", SHARED / "data"))
STORIES = MODELS_DIR / "stories260K"


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test asset {path} is missing: set OMNIQ_MODELS_DIR / OMNIQ_DATA_DIR or put ../shared beside the repo")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return require(STORIES)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(DATA_DIR)


@pytest.fixture(scope="session")
def stories(stories_dir):
    from omniq_lightning.models import load_model

    return load_model(str(stories_dir), dtype="float32")
