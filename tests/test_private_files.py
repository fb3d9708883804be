"""What Strata writes is private from its first byte: engine files 0600 and
directories 0700 whatever the umask, the token never visible wider, a
home tightened by `strata up`, run directories refused when they are not
this user's."""

from __future__ import annotations

import os
import stat

import pytest

from engine import Store
from pageserver.compute.paths import private_dir
from pageserver.errors import UnsafeDirectoryError
from pageserver.service import daemon

from .pg import requires_root


def modes(top: str) -> dict[str, int]:
    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, top)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


@pytest.fixture
def open_umask():
    old = os.umask(0)  # the widest: only the modes Strata asks for count
    try:
        yield
    finally:
        os.umask(old)


def test_a_store_writes_only_private_files_whatever_the_umask(tmp_path, open_umask):
    path = str(tmp_path / "store")
    with Store.open(path) as s:
        tl = s.create_timeline()
        for i in range(50):
            tl.commit({i: bytes([i]) * 8192}, durable=True)
        s.flush(tl)
        s.branch(tl)
    seen = modes(path)
    assert seen, "the store wrote nothing?"
    loose = {p: oct(m) for p, m in seen.items()
             if m != (0o700 if os.path.isdir(os.path.join(path, p)) else 0o600)}
    assert not loose


def test_the_token_is_private_before_it_is_renamed_into_place(tmp_path, open_umask, monkeypatch):
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)  # only the creation's mode counts
    home = str(tmp_path)
    token = daemon.ensure_token(home)
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(os.path.join(home, daemon.TOKEN)).st_mode) == 0o600


def test_up_tightens_an_existing_home(tmp_path):
    home = tmp_path / "home"
    (home / "store" / "layers").mkdir(parents=True)
    (home / "token").write_text("x")
    (home / "store" / "layers" / "l1").write_text("y")
    for p, m in ((home, 0o755), (home / "store", 0o775), (home / "store" / "layers", 0o755),
                 (home / "token", 0o644), (home / "store" / "layers" / "l1", 0o666)):
        os.chmod(p, m)
    outside = tmp_path / "outside"
    outside.write_text("z")
    os.chmod(outside, 0o644)
    os.symlink(outside, home / "link")
    assert daemon.tighten(str(home)) == 4  # (the home itself by private_dir)
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert {p: oct(m) for p, m in modes(str(home)).items() if p != "link"} == {
        "store": "0o700", "store/layers": "0o700", "token": "0o600", "store/layers/l1": "0o600"}
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o644  # a link is not followed
    assert daemon.tighten(str(home)) == 0


def test_a_private_directory_is_made_with_its_mode_or_tightened(tmp_path, open_umask):
    d = str(tmp_path / "run")
    private_dir(d, 0o711)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o711
    os.chmod(d, 0o777)
    private_dir(d, 0o711)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o711


def test_a_private_directory_that_is_a_link_or_a_file_is_refused(tmp_path):
    os.symlink(str(tmp_path), tmp_path / "link")
    with pytest.raises(UnsafeDirectoryError, match="symbolic link"):
        private_dir(str(tmp_path / "link"))
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeDirectoryError, match="not a directory"):
        private_dir(str(tmp_path / "file"))


@requires_root
def test_a_run_directory_another_user_made_is_refused(tmp_path):
    d = tmp_path / "strata-0"
    d.mkdir(mode=0o777)
    os.chown(d, 65534, 65534)  # nobody got there first (a predictable path in /tmp)
    with pytest.raises(UnsafeDirectoryError, match="belongs to uid 65534"):
        private_dir(str(d))
    assert os.stat(d).st_uid == 65534  # and it was left as it was


def _snapshot(top: str) -> dict[str, tuple[int, bytes]]:
    import hashlib

    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), top) + "/"] = (0, b"")
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, top)] = (os.path.getsize(p), hashlib.sha256(f.read()).digest())
    return out


def _store_with_repairs_pending(path: str) -> None:
    """A store that recovery would change: a log not checkpointed with a
    torn tail, a stray temp file."""
    from engine.fs import TMP_SUFFIX

    s = Store.open(path, background=False)
    tl = s.create_timeline()
    for i in range(20):
        tl.commit({i: bytes([i]) * 8192}, durable=True)
    s.flush(tl)
    tl.commit({99: b"x" * 8192}, durable=True)
    s._lock.release()  # (a crash: no close, no checkpoint)
    logs = sorted(os.listdir(os.path.join(path, "log")))
    with open(os.path.join(path, "log", logs[-1]), "ab") as f:
        f.write(b"\x17" * 100)  # a torn record at the tail
    with open(os.path.join(path, "timelines", tl.id, "image-x" + TMP_SUFFIX), "wb") as f:
        f.write(b"half a layer")


def test_a_store_opened_through_the_overlay_is_checked_and_left_as_it_was(tmp_path):
    from engine.fs import OverlayFileSystem

    path = str(tmp_path / "store")
    _store_with_repairs_pending(path)
    before = _snapshot(path)
    with Store.open(path, fs=OverlayFileSystem(), background=False) as s:
        report = s.check()
        assert [t.get(99) for t in [s.timeline(s.timelines()[0])]] == [b"x" * 8192]
    assert not report.problems, report.problems
    assert _snapshot(path) == before  # nothing on disk changed
    with Store.open(path, background=False):
        pass
    assert _snapshot(path) != before  # (as an ordinary open, which repairs, would have)


def test_check_refuses_a_home_with_no_store_and_makes_none(tmp_path):
    import subprocess

    from .pg import STRATA

    home = tmp_path / "typo"
    r = subprocess.run([*STRATA, "--home", str(home), "check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no store at" in r.stderr, r.stderr
    assert not home.exists()
