"""The output directory is safe to share and to script around: files follow the umask, one
directory holds one live run, and a symlinked directory is replaced in its target. Tiny runs of the
``finegates`` command line (the models and data of test_cli.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from finegates.cli import main
from test_cli import _ft_args, _steps, sst_small, tiny_bert  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _modes(root: Path):
    """(path, permission bits) of every file and directory under root."""
    return [(p, stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]]


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_every_file_follows_the_umask(mask, tiny_bert, sst_small, tmp_path):
    out = tmp_path / "run"
    old = os.umask(mask)
    try:
        assert main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "2", "--checkpointing-steps", "1")) == 0
    finally:
        os.umask(old)
    assert (out / "checkpoints" / "step-2" / "model.safetensors").is_file()
    wrong = [(str(p), oct(m)) for p, m in _modes(out) if m != (0o777 if p.is_dir() else 0o666) & ~mask]
    assert not wrong, wrong


def test_overwrite_through_a_symlink_replaces_its_target(tiny_bert, sst_small, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    real, link = runs / "real", runs / "link"
    assert main(_ft_args(tiny_bert, sst_small, real, "--max-steps", "1", "--no-compact")) == 0
    link.symlink_to("real")
    for steps in (2, 3):  # the second replacement works through the link as well
        assert main(_ft_args(tiny_bert, sst_small, link, "--max-steps", str(steps), "--no-compact", "--overwrite")) == 0
        assert link.is_symlink() and os.readlink(link) == "real"
        assert _steps(real) == steps and sorted(os.listdir(runs)) == ["link", "real"]
