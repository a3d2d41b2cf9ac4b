"""asymlora.io: atomic writes leave the umask's modes (not mkstemp's 0600 / mkdtemp's 0700) and nothing half-written."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from asymlora.io import atomic_dir, atomic_write_bytes, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_0644_under_umask_022(tmp_path, umask_022) -> None:
    atomic_write_text(tmp_path / "results.json", "{}\n")
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert _mode(tmp_path / "results.json") == 0o644
    assert _mode(tmp_path / "a.bin") == 0o644
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"


def test_a_published_directory_gets_0755_and_its_files_0644(tmp_path, umask_022) -> None:
    # safetensors writes 0600 and mkdtemp makes 0700: a server running as another user could read neither
    with atomic_dir(tmp_path / "adapter") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "README.md").write_text("hi")
    assert _mode(tmp_path / "adapter") == 0o755
    assert _mode(tmp_path / "adapter" / "adapter_model.safetensors") == 0o644
    assert _mode(tmp_path / "adapter" / "sub") == 0o755
    assert _mode(tmp_path / "adapter" / "sub" / "README.md") == 0o644


def test_a_stricter_umask_is_respected(tmp_path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.txt") == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("partial")
        raise Boom
    assert not (tmp_path / "d").exists()
    with pytest.raises(TypeError):
        atomic_write_text(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
