"""What every command shares: its name, one log format, one way to stop on a runtime error, the sample data.

Wrong flags are argparse's business (usage and ``error:``, status 2). Everything that goes wrong
after the flags parsed (a missing file, no CUDA, a bad checkpoint, a setting the library rejects)
is one line ``<command>: error: <what>`` on stderr and status 2, printed by `run_command` alone;
the library names the setting (``ValueError.setting``) and `apt_train.flags.flag_message` names
its flag. Set ``APT_TRACEBACK=1`` to see the traceback instead.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from ..flags import flag_message
from . import COMMANDS

Argv = Optional[Sequence[str]]

#: an OSError's errno in words (the rest: the system's own text, lower-cased)
REASONS = {
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "input/output error (a failing disk or network file system?)",
}


def prog_name(command: str) -> str:
    """The name a command reports under: what the user typed (``train.py`` for ``python
    tools/train.py``, ``apt-train`` for the console script), else ``command``."""
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return typed if typed in (command, f"{COMMANDS.get(command)}.py") else command


def os_error_text(e: OSError) -> str:
    """``<path>: <reason in words>`` (``shards/x.tar: no such file or folder``)."""
    reason = REASONS.get(e.errno, (e.strerror or str(e)).lower()) if e.errno else str(e)
    if e.filename is None:
        return reason
    path = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{path}: {reason}"


def error_text(e: BaseException, flags: Optional[Mapping[str, str]] = None) -> str:
    """One line for a runtime error: an OSError as path and reason, a setting's error led by its flag."""
    if isinstance(e, OSError) and e.errno is not None:
        return os_error_text(e)
    return " ".join(flag_message(e, flags).split("\n"))


def run_command(command: str, body: Callable[[Argv], int], argv: Argv = None, *,
                flags: Optional[Mapping[str, str]] = None, errors: tuple[type[Exception], ...] = ()) -> int:
    """``body(argv)``, with its runtime errors (ValueError, OSError: `apt_train.SetupError`, the
    loader's ``TooManySkipped``, a missing file; and ``errors``) as one ``<command>: error: ...`` line
    and status 2, and Ctrl-C as one line and status 130. ``flags``: the command's own flag for a setting."""
    try:
        return body(argv)
    except (ValueError, OSError, *errors) as e:
        if os.environ.get("APT_TRACEBACK"):
            raise
        print(f"{prog_name(command)}: error: {error_text(e, flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog_name(command)}: interrupted", file=sys.stderr)
        return 130


class _Plain(logging.Formatter):
    """The terminal format: the message alone, ``warning:`` / ``error:`` before the ones that need it."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written, not when the command started:
    a command run in-process (tests, notebooks) must not keep writing to a stream that was replaced
    and closed since. Lines go through ``tqdm.write``, which lifts a progress bar on the same stream
    above them and draws it again below."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO, stream=None) -> None:
    """The one log format of every command, on stderr: the message alone on a terminal, timestamped
    with the level and logger where the output goes to a file (a batch job's log). Replaces the handler
    of an earlier command in this process, and leaves any other handler (pytest's, an embedding app's)."""
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    tty = getattr(handler.stream, "isatty", lambda: False)()
    handler.setFormatter(_Plain("%(message)s") if tty else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.set_name("apt-command")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "apt-command"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def sample_data(split: Optional[str] = None) -> Optional[str]:
    """The sample dataset's folder: ``shards`` in the working directory, else the ``shards/`` of the
    checkout the command runs from (``python tools/x.py``, or the checkout's ``apt_train``); None
    when neither exists. ``split``: ``shards:<split>``."""
    candidates = [Path("shards")]
    if sys.argv and sys.argv[0]:
        script = Path(sys.argv[0]).resolve()
        if script.parent.name == "tools":
            candidates.append(script.parent.parent / "shards")
    candidates.append(Path(__file__).resolve().parents[2] / "shards")
    for c in candidates:
        if c.is_dir():
            return str(c) + (f":{split}" if split else "")
    return None

