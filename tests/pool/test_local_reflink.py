"""Copy-on-write clones on a real reflink file system: a loop-mounted XFS (``-m reflink=1``)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from pg_query import aquery

from aldaas.pool import Kind, LocalProvider, LocalSettings

pytestmark = pytest.mark.slow


@pytest.fixture
def xfs_data_dir(data_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """``data_dir`` as the mount point of a fresh 320 MiB sparse XFS image with reflink on."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop XFS needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (Debian: apt-get install xfsprogs)")
    image = data_dir.parent / "xfs.img"
    with image.open("wb") as f:
        f.truncate(320 << 20)
    made = subprocess.run(
        ["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()}")
    data_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(data_dir)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an XFS image here: {mounted.stderr.strip()}")
    try:
        yield data_dir
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], check=False)


async def test_if_the_data_folder_is_on_xfs_with_reflink_then_clones_are_reflinked(
    xfs_data_dir: pathlib.Path,
) -> None:
    """If the data folder is on XFS with reflink, then a clone is a reflink copy that works."""
    provider = LocalProvider(LocalSettings(data_dir=xfs_data_dir, clone_method="reflink"))
    try:
        await provider.create_volume("v", {})
        await provider.seal("v", "s", {})
        endpoint = await provider.clone("s", "c", {})
        assert provider.clone_method("c") == "reflink"
        assert await aquery(endpoint, "SELECT count(*) FROM pg_database") == [(4,)]
    finally:
        for resource in await provider.list():
            await provider.destroy(resource.kind, resource.name)
    assert await provider.list(Kind.CLONE) == []
