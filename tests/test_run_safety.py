"""The output directory is safe to share and to script around: files follow the umask, one
directory holds one live run, and a symlinked directory is replaced in its target. Tiny runs of the
``finegates`` command line (the models and data of test_cli.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from finegates.app.cli import main
from test_cli import _ft_args, _steps, sst_small, tiny_bert  # noqa: F401  (fixtures)
from test_cli_errors import _error_line

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


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s flock, as a live run does, until it ends or is killed."""
    code = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_one_output_directory_holds_one_live_run(tiny_bert, sst_small, tmp_path, capsys):
    """A second run into the directory of a live one is refused before it touches anything; a run
    that was killed leaves nothing held behind."""
    new, done = tmp_path / "new", tmp_path / "done"
    assert main(_ft_args(tiny_bert, sst_small, done, "--max-steps", "1", "--no-compact")) == 0
    capsys.readouterr()
    before = sorted(os.listdir(tmp_path))
    files = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    holders = [_hold_lock(tmp_path / ".new.finegates-lock"), _hold_lock(tmp_path / ".done.finegates-lock")]
    try:
        _error_line(capsys, _ft_args(tiny_bert, sst_small, new, "--max-steps", "1"), "--output-dir", "in use")
        _error_line(capsys, _ft_args(tiny_bert, sst_small, done, "--max-steps", "1", "--overwrite"), "in use")
        assert not new.exists() and {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == files
    finally:
        for h in holders:
            h.kill()  # a crashed run: its lock file stays, its lock does not
            h.wait()
    assert main(_ft_args(tiny_bert, sst_small, done, "--max-steps", "2", "--no-compact", "--overwrite")) == 0
    assert _steps(done) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(before + [".new.finegates-lock"])  # no lock file of its own left


def test_a_directory_in_an_unwritable_parent_is_locked_itself(tmp_path, monkeypatch):
    """No lock file can sit next to it there, so the directory itself carries the flock."""
    from finegates.app.cli import build_parser
    from finegates.app.errors import UsageError
    from finegates.app.run_dir import RunDir

    out = tmp_path / "run"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    parser = build_parser()
    args = parser.parse_args(["finetune", "--output-dir", str(out)])
    first = RunDir(args, parser, lambda: out)
    with pytest.raises(UsageError, match="in use"):
        RunDir(args, parser, lambda: out)
    first.close()
    RunDir(args, parser, lambda: out).close()
    assert sorted(os.listdir(tmp_path)) == ["run"] and not os.listdir(out)
