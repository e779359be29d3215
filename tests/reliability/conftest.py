"""Fixtures of the reliability tests: a tiny synthetic world, generated once, copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .helpers import synthetic_block


@pytest.fixture(scope="session")
def pristine_world(tmp_path_factory) -> Path:
    """A synthetic world in VOC layout: 6 train + 2 val images of 32 px (generated once)."""
    from eps.data.synthetic import generate

    root = tmp_path_factory.mktemp("pristine") / "data"
    generate(root, num_train=6, num_val=2, size=32, seed=5)
    return root


@pytest.fixture
def world(pristine_world, tmp_path) -> Path:
    """A private copy of the tiny world, free to damage."""
    data = tmp_path / "data"
    shutil.copytree(pristine_world, data)
    return data


@pytest.fixture
def indexed(world, tmp_path) -> dict:
    """The private world and its index (built in-process, quickly)."""
    from eps.data.build import build_index

    index = tmp_path / "idx" / "index.csv"
    build_index(synthetic_block(world), index)
    return {"data": world, "index": index, "root": tmp_path}
