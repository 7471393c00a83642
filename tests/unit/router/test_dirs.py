"""The router role's directories keep their modes whatever the agent's umask (its unit
runs with UMask=0077): daemons running as other users must traverse them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.roles.router.role import _mkdir


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_mkdir_sets_mode_on_the_dir_and_the_parents_it_made(
    tmp_path: Path, strict_umask: None
) -> None:
    (tmp_path / "a").mkdir(mode=0o700)
    leaf = tmp_path / "a" / "b" / "c"
    _mkdir(leaf, 0o755, parents=True)
    assert mode(leaf) == mode(leaf.parent) == 0o755
    assert mode(tmp_path / "a") == 0o700  # existed before: not touched


def test_mkdir_existing_dir_is_fixed_and_exist_ok_false_still_refuses(
    tmp_path: Path, strict_umask: None
) -> None:
    d = tmp_path / "www"
    d.mkdir(mode=0o700)
    _mkdir(d, 0o755)
    assert mode(d) == 0o755
    with pytest.raises(FileExistsError):
        _mkdir(d, 0o755, exist_ok=False)
