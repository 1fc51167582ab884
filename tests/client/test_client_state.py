"""The client's cached-lease file: per server and name, 0600, atomic, tolerant of junk."""

from __future__ import annotations

import pathlib
import stat

from aldaas.client._state import (
    CachedLease,
    forget,
    forget_if_unchanged,
    load,
    save,
    state_dir,
    state_path,
)


def test_if_xdg_state_home_is_set_then_it_is_used_else_home() -> None:
    """If XDG_STATE_HOME is an absolute path, then it holds the folder; otherwise ~/.local/state."""
    assert state_dir({"XDG_STATE_HOME": "/x/state", "HOME": "/h"}) == pathlib.Path(
        "/x/state/aldaas"
    )
    assert state_dir({"XDG_STATE_HOME": "relative", "HOME": "/h"}) == pathlib.Path(
        "/h/.local/state/aldaas"
    )
    assert state_dir({"HOME": "/h"}) == pathlib.Path("/h/.local/state/aldaas")


def test_if_server_or_name_differ_then_the_files_differ(tmp_path: pathlib.Path) -> None:
    """If two (server, name) pairs differ, even only in punctuation, then their files differ."""
    a = state_path(tmp_path, "db.example:443", "main")
    b = state_path(tmp_path, "db.example:443", "other")
    c = state_path(tmp_path, "db.example_443", "main")
    assert len({a, b, c}) == 3
    assert a.name.startswith("db.example_443--main-")
    assert a == state_path(tmp_path, "db.example:443", "main")


def test_if_a_lease_is_saved_then_it_loads_back_with_owner_only_modes(
    tmp_path: pathlib.Path,
) -> None:
    """If a lease is saved, then it loads back equal, the file is 0600 and the folder 0700."""
    path = state_path(tmp_path / "aldaas", "s", "n")
    lease = CachedLease(
        server="s",
        name="n",
        lease_id="L1",
        secret="sekrit",
        saved_at=12.5,
        info={"user": "u", "password": "pw"},
    )
    save(path, lease)
    assert load(path) == lease
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "sekrit" not in repr(lease)
    assert "pw" not in repr(lease)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_if_the_file_is_missing_or_junk_then_load_gives_none(tmp_path: pathlib.Path) -> None:
    """If the file is missing, not JSON, or lacks a field, then load returns None."""
    path = tmp_path / "x.json"
    assert load(path) is None
    path.write_text("{not json")
    assert load(path) is None
    path.write_text('{"server": "s", "name": "n", "lease_id": "L"}')
    assert load(path) is None


def test_if_a_lease_is_forgotten_twice_then_nothing_fails(tmp_path: pathlib.Path) -> None:
    """If forget is called on a saved and then a missing file, then the file is gone, no error."""
    path = tmp_path / "x.json"
    save(path, CachedLease(server="s", name="n", lease_id="L", secret="k"))
    forget(path)
    forget(path)
    assert not path.exists()


def test_if_another_process_resaved_the_lease_then_the_old_one_does_not_delete_it(
    tmp_path: pathlib.Path,
) -> None:
    """If the file was re-saved since, then forget_if_unchanged keeps it; unchanged, removes it."""
    path = tmp_path / "x.json"
    mine = CachedLease(server="s", name="n", lease_id="L", secret="k", saved_at=100.25)
    theirs = CachedLease(server="s", name="n", lease_id="L", secret="k", saved_at=200.5)
    save(path, theirs)
    forget_if_unchanged(path, mine)
    assert load(path) == theirs
    forget_if_unchanged(path, theirs)
    assert not path.exists()
