"""Atomic writes: all or nothing, and the permissions a plain write would give (a shared run directory must
stay readable by the team, not only by the user who trained)."""
from __future__ import annotations

import os
import stat

import pytest

from runner import atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    atomic._umask.cache_clear()
    yield
    os.umask(old)
    atomic._umask.cache_clear()


def test_files_and_folders_get_the_umask_permissions_of_a_plain_write(tmp_path, umask_022):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic.write_text(tmp_path / "report.md", "# report\n")
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
    with atomic.atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, tmp / "adapter_model.safetensors")  # safetensors writes it owner-only
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "quality.json"
    atomic.write_text(target, "old")

    def disk_gone(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "fsync", disk_gone)
    with pytest.raises(OSError, match="disk gone"):
        atomic.write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["quality.json"]
