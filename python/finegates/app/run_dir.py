"""The output directory of a run: what may happen to it, decided before anything loads.

- A directory finegates did not make (no ``finegates_run.json``) is never written, whatever the flags.
- An earlier run is replaced (its default directory, or ``--overwrite``) only once the new run has
  finished: the new run works in a sibling ``.<name>.finegates-new`` that is swapped in at the end, so
  an interrupted or failed run leaves the earlier one as it was.
- ``--resume-from-checkpoint`` continues a run in its own directory: the checkpoint must lie in
  ``OUTPUT_DIR/checkpoints``, the arguments that shape the run must be those it was started with
  (``--max-steps`` / ``--epochs`` may grow, not shrink below the checkpoint's step), and ``latest`` on a
  finished run without checkpoints is refused rather than retrained over. A resumed run writes its
  results (metrics, log, plot, compact model) into a sibling ``.<name>.finegates-new`` whose
  ``checkpoints`` is a link to the run's own, and moves them in only when it has finished: the earlier
  results stay as they were until then, and an interrupted resume leaves them with its checkpoints.
- A path that cannot be written is refused up front, in one line.
- One directory holds one live run: the main process holds an flock on a sibling
  ``.<name>.finegates-lock`` for the run's life (the kernel drops it however the process ends), and a
  second run into the directory is refused before it touches anything.
- A symlinked directory is replaced in its target (the link stays a link); inputs inside a directory
  to replace, and a ``finegates_run.json`` that cannot be read, are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover  (not on Windows: no lock there)
    fcntl = None

__all__ = ["RunDir", "MARKER", "CHECKPOINT_RE", "TRAIN_STATE", "find_checkpoint"]

MARKER = "finegates_run.json"  # written first into every output directory this tool creates

# Arguments a resumed run may change: where and how often it writes, how long it runs, what it
# measures at the end. Every other argument shapes the run and must match.
MAY_DIFFER = frozenset({
    "output_dir", "overwrite", "resume_from_checkpoint", "max_steps", "epochs", "logging_steps",
    "checkpointing_steps", "keep_checkpoints", "no_compact", "latency_batch_size", "eval_batch_size", "cpu",
    "dataset_cache",
})

# Arguments that name input files or directories: none may lie in a run directory this run replaces.
INPUT_PATHS = ("model", "tokenizer", "config", "train_file", "validation_file", "dataset")


CHECKPOINT_RE = re.compile(r"^step-(\d+)$")  # OUTPUT_DIR/checkpoints/step-N, written by the training loop
TRAIN_STATE = "train_state.json"  # the training loop's counters, in every checkpoint it writes

# What a finished run leaves beside its checkpoints: a resumed run replaces these when it finishes.
RESULTS = frozenset({"metrics.json", "train_log.csv", "train_options.json", "layers.json", "sparsity_per_layer.png",
                     "compact"})


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def find_checkpoint(output_dir: Path) -> Optional[Path]:
    """The latest complete ``checkpoints/step-N`` of a run, or None."""
    ck = Path(output_dir) / "checkpoints"
    if not ck.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in ck.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def _checkpoint_step(checkpoint: Path) -> int:
    m = CHECKPOINT_RE.match(checkpoint.name)
    return int(m.group(1)) if m else 0


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _make_dirs(d: Path) -> List[Path]:
    """Makes ``d`` and its missing parents; returns those it made, outermost first."""
    missing = []
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir(exist_ok=True)
    return missing[::-1]


def _take_lock(path: Path) -> Optional[int]:
    """An open descriptor of ``path`` (a lock file, made if missing, or a directory) under an
    exclusive flock, or None while another process holds it. A lock file its holder removed
    meanwhile is not a lock any more: then a fresh one is taken."""
    while True:
        fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _check_writable(path: Path) -> None:
    """The directory can be made and written: every existing part of the path is a directory and the
    deepest one is writable."""
    base = _first_existing(path)
    if base != path.absolute() and not base.is_dir():
        raise UsageError(f"--output-dir {str(path)!r}: {str(base)!r} is a file, not a directory")
    target = path if path.exists() else base
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {str(path)!r}: {str(target)!r} is not writable (permission denied); "
                         "choose another directory")


def _started_with(run: Path, parser: argparse.ArgumentParser) -> Dict:
    """The arguments the run in ``run`` was started with (its marker's argv, parsed again). A marker
    that cannot be read is refused: the resume checks and the replacement both rely on it."""
    marker = run / MARKER
    try:
        argv = json.loads(marker.read_text())["argv"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise TypeError("argv is not a list of strings")
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            started = vars(parser.parse_args(argv))
        if started.get("command") is None:
            raise ValueError("argv names no command")
        return started
    except (OSError, ValueError, KeyError, TypeError, SystemExit):
        raise UsageError(f"{str(marker)!r} is unreadable or malformed, so the run in {str(run)!r} cannot be "
                         "checked; restore that file, remove the directory by hand, or choose another --output-dir"
                         ) from None


def _flag(key: str, value) -> str:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"no {name}"
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    return f"{name} {value}"


class RunDir:
    """Where a run writes (``work``), where its results end up (``path``), and where it resumes from."""

    def __init__(self, args, parser: argparse.ArgumentParser, default_path: Callable[[], Path]):
        if args.output_dir == "":
            raise UsageError("--output-dir is empty; name a directory, or leave the flag out for the default one")
        self.default = args.output_dir is None
        self.path = Path(args.output_dir) if args.output_dir else default_path()
        self.real = Path(os.path.realpath(self.path))  # what is replaced when the path is a symlink
        self.replace = False
        self.staged = False  # a resume: results in the sibling until the run finishes
        self.created = False
        self.resume_from: Optional[Path] = None
        self.started: Optional[Dict] = None  # the arguments of the run already in the directory
        self._lock: Optional[int] = None  # the lock's descriptor
        self._made: List[Path] = []
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--output-dir {str(self.path)!r} exists and is not a directory")
        _check_writable(self.path)
        self._hold()
        try:
            self._decide(args, parser)
        except BaseException:
            self.close()
            raise

    def _decide(self, args, parser) -> None:
        """Resume, replace the earlier run, or start in a new (or empty) directory."""
        r = args.resume_from_checkpoint
        if r is not None:
            self._resume(args, r, parser)
        elif self.path.exists() and any(self.path.iterdir()):
            self._check_ours(parser)
            if not (args.overwrite or self.default):
                raise UsageError(
                    f"--output-dir {str(self.path)!r} already holds a run; pass --overwrite to replace it "
                    "or --resume-from-checkpoint latest to continue it"
                )
            self.replace = True
            self._check_inputs(args)

    def _hold(self) -> None:
        """One output directory, one live run: a lock file next to it, held until ``close``. Only the
        main process (rank 0) takes it; the kernel drops it when the process ends, however it ends."""
        if fcntl is None or os.environ.get("RANK", "0") != "0":
            return
        self._made = _make_dirs(self.real.parent)
        self._lock_at = self._lock_path()
        self._lock = _take_lock(self._lock_at)
        if self._lock is None:
            raise UsageError(f"--output-dir {str(self.path)!r} is in use by another finegates run; wait for it "
                             "to end or choose another directory")

    def close(self) -> None:
        """Releases the lock and removes its file, and the directories made for it if still empty."""
        if self._lock is not None:
            if self._lock_at != self.real:  # removed while held: a run that opened it retries
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._lock_at)
            os.close(self._lock)
            self._lock = None
        for d in reversed(self._made):
            try:
                os.rmdir(d)
            except OSError:
                break  # holds the run (or another's)
        self._made = []

    def _lock_path(self) -> Path:
        """A sibling lock file; the directory itself where its parent cannot be written (such a
        directory is never swapped, so its lock stays the same)."""
        if self.real.is_dir() and not os.access(self.real.parent, os.W_OK | os.X_OK):
            return self.real
        return self._sibling("lock")

    @property
    def work(self) -> Path:
        """The directory the run writes into: a sibling (of a symlink's target) while it replaces an
        earlier run or resumes one."""
        return self._sibling("new") if self.replace or self.staged else self.path

    def _sibling(self, what: str) -> Path:
        return self.real.parent / f".{self.real.name}.finegates-{what}"

    def _check_inputs(self, args) -> None:
        """Replacing the earlier run deletes everything in it, inputs of this run included."""
        for key in INPUT_PATHS:
            value = getattr(args, key, None)
            for v in value if isinstance(value, list) else [value]:
                if v and os.path.exists(v) and Path(os.path.realpath(v)).is_relative_to(self.real):
                    raise UsageError(f"{_flag(key, repr(v))} lies inside --output-dir {str(self.path)!r}, which this "
                                     "run replaces (and so deletes); move it out of that directory first")

    def _check_ours(self, parser) -> None:
        if not (self.path / MARKER).exists():
            raise UsageError(
                f"--output-dir {str(self.path)!r} is not empty and was not written by finegates; choose another directory"
            )
        self.started = _started_with(self.path, parser)

    def _resume(self, args, r: str, parser) -> None:
        if r == "latest":
            if not self.path.exists() or not any(self.path.iterdir()):
                return  # nothing yet: start from the beginning
            self._check_ours(parser)
            self.resume_from = find_checkpoint(self.path)
            if self.resume_from is None:
                if (self.path / "metrics.json").exists():
                    raise UsageError(
                        f"--resume-from-checkpoint latest: the run in {str(self.path)!r} finished and has no checkpoint "
                        "to continue from; pass --overwrite to replace it or choose another --output-dir"
                    )
                return  # a run that died before its first checkpoint: start it again in place
        else:
            rp = Path(r)
            if not rp.is_dir():
                raise UsageError(f"--resume-from-checkpoint {r!r} is not a directory; pass a checkpoints/step-N directory or 'latest'")
            if not (rp / TRAIN_STATE).exists():
                raise UsageError(f"--resume-from-checkpoint {r!r} is not a finegates checkpoint (no {TRAIN_STATE})")
            owner = rp.absolute().parent.parent
            if rp.absolute().parent.name != "checkpoints" or owner.resolve() != self.path.absolute().resolve():
                raise UsageError(
                    f"--resume-from-checkpoint {r!r} belongs to the run in {str(owner)!r}, not to --output-dir "
                    f"{str(self.path)!r}; a run continues in its own directory (--output-dir {str(owner)!r})"
                )
            self._check_ours(parser)
            self.resume_from = rp
        self._check_same_run(args)
        self.staged = True

    def _check_same_run(self, args) -> None:
        step = _checkpoint_step(self.resume_from)
        if args.max_steps is not None and args.max_steps < step:
            raise UsageError(f"--max-steps {args.max_steps} is below the step of the checkpoint it resumes "
                             f"({step}, {str(self.resume_from)!r}); pass --max-steps {step} or more")
        before, now = self.started, vars(args)
        differ = [k for k in sorted(now) if k not in MAY_DIFFER and k in before and before[k] != now[k]]
        if differ:
            was = ", ".join(_flag(k, before[k]) for k in differ)
            is_ = ", ".join(_flag(k, now[k]) for k in differ)
            raise UsageError(f"--resume-from-checkpoint: the run in {str(self.path)!r} was started with {was}, "
                             f"this command has {is_}; resume with the same settings or start a new --output-dir")

    def create(self, accelerator, args, argv) -> None:
        """Makes the working directory (once everything has loaded) and marks it as a finegates run."""
        if accelerator.is_main_process and self.staged:
            self._stage()
        elif accelerator.is_main_process:
            work = self.work
            if self.replace:
                shutil.rmtree(work, ignore_errors=True)  # left by an earlier interrupted replacement
            existed = work.exists()
            work.mkdir(parents=True, exist_ok=True)
            self.created = not existed or self.replace
            from ..files import write_json

            if not (work / MARKER).exists():
                write_json(work / MARKER, dict(command=args.command, argv=list(argv), started=time.time()))
        accelerator.wait_for_everyone()

    def _stage(self) -> None:
        """A resumed run's working directory: its checkpoints are the run's own (a link), its log
        starts as the run's."""
        work = self.work
        shutil.rmtree(work, ignore_errors=True)  # left by an earlier interrupted resume
        work.mkdir()
        (self.real / "checkpoints").mkdir(exist_ok=True)
        os.symlink(self.real / "checkpoints", work / "checkpoints", target_is_directory=True)
        if (self.real / "train_log.csv").is_file():
            shutil.copy2(self.real / "train_log.csv", work / "train_log.csv")

    def _unstage(self) -> None:
        """The finished resume's results replace the earlier ones, entry by entry; the earlier
        run's results this run did not write (a compact model, with --no-compact now) go."""
        work = self.work
        (work / "checkpoints").unlink()
        new = {e.name for e in work.iterdir()}
        for name in RESULTS - new:
            _remove(self.real / name)
        old = self._sibling("old")
        for entry in work.iterdir():
            dest = self.real / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
            os.replace(entry, dest)
        shutil.rmtree(old, ignore_errors=True)
        work.rmdir()

    def finish(self) -> None:
        """Main process, after every process is done: swap the new run in place of the earlier one
        (in the target of a symlinked output directory, so the link stays a link), or move a
        resumed run's results in."""
        if self.staged and self.work.exists():
            self._unstage()
            return
        if not self.replace or not self.work.exists():
            return
        old = self._sibling("old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(self.real, old)
        os.replace(self.work, self.real)
        shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        """After a failure: remove what this run created (the earlier run, if any, stays as it was),
        unless it holds a checkpoint to resume from in place."""
        if self.staged:
            shutil.rmtree(self.work, ignore_errors=True)  # the link only: the checkpoints stay
            print(f"finegates: the earlier results in {self.path} are unchanged; this run's checkpoints are kept "
                  "(resume with --resume-from-checkpoint latest)", file=sys.stderr)
            return
        if not self.created or not self.work.exists():
            return
        if self.replace:
            shutil.rmtree(self.work, ignore_errors=True)
            print(f"finegates: the earlier run in {self.path} is unchanged", file=sys.stderr)
            return
        if find_checkpoint(self.path) is not None:
            print(f"finegates: partial run kept in {self.path} (resume with --resume-from-checkpoint latest)",
                  file=sys.stderr)
            return
        shutil.rmtree(self.real, ignore_errors=True)  # rmtree refuses a symlink itself
