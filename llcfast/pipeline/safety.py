"""Run folders may come from elsewhere (a tarball someone sent): llcfast
writes only regular files inside the run folder, never through a symbolic
link, and every name a manifest turns into a path is checked first. One
process at a time works on a run folder (a lock file with its PID and host).

Malformed files raise RunFileError: one line naming the file and what is
wrong with it."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import warnings
from contextlib import contextmanager
from typing import Callable

LOCK = ".llcfast.lock"
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")  # one path component, no leading dot


class RunFileError(ValueError):
    """A file of a run folder is malformed or unsafe; the message names it."""


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


def is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_relative(run_dir: str, name, what: str, where: str) -> str:
    """``name`` as a path inside ``run_dir``: relative, made of safe
    components, and resolving (through any links) to a place inside it."""
    if not isinstance(name, str) or not name:
        raise RunFileError(f"{where}: {what} must be a non-empty relative path, got {name!r}")
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or any(not SAFE_NAME.match(p) for p in parts):
        raise RunFileError(f"{where}: {what} {name!r} is not a safe relative path (components of letters, digits "
                           "and _ . + -, none starting with a dot)")
    path = os.path.join(run_dir, *parts)
    inside(run_dir, path)
    return path


def inside(run_dir: str, path: str) -> str:
    """``path``, refused unless it resolves inside ``run_dir`` and is not
    itself a symbolic link."""
    root = os.path.realpath(run_dir)
    if os.path.islink(path):
        raise RunFileError(f"{path} is a symbolic link; llcfast does not write through links (remove it)")
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise RunFileError(f"{path} resolves to {real}, outside the run folder {root}; llcfast writes only inside it")
    return path


def check_manifest(manifest, path: str, run_dir: str) -> dict:
    """The manifest's shape: a config object and checkpoints whose steps are
    integers and whose files are safe paths inside the run folder."""
    if not isinstance(manifest, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if not isinstance(manifest.get("config"), dict):
        raise RunFileError(f"{path}: has no 'config' object (it must hold the run's configuration)")
    checkpoints = manifest.get("checkpoints")
    if not isinstance(checkpoints, list):
        raise RunFileError(f"{path}: 'checkpoints' must be a list, got {type(checkpoints).__name__}")
    for i, entry in enumerate(checkpoints):
        if not isinstance(entry, dict) or not is_step(entry.get("step")):
            raise RunFileError(f"{path}: checkpoints[{i}] must be an object with an integer 'step' >= 0, got "
                               f"{entry!r:.80}")
        check_relative(run_dir, entry.get("file"), f"checkpoints[{i}].file", path)
    return manifest


def record_problem(record) -> "str | None":
    """Why a results.jsonl line is not a sweep record, or None where it is:
    an object with an integer step and its settings key (and checkpoint, a
    string), and either an error or an LLC, with every other field a number
    (or null where it was not finite) or the list it should be."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record object"
    if not is_step(record.get("step")):
        return f"its step {record.get('step')!r} is not an integer >= 0"
    if not isinstance(record.get("settings"), str):
        return f"its 'settings' is {record.get('settings')!r}, not a string"
    if not isinstance(record.get("checkpoint", ""), str):
        return f"its 'checkpoint' is {record['checkpoint']!r}, not a string"
    if "error" in record:
        return None if isinstance(record["error"], str) else "its 'error' is not a string"
    if "llc_mean" not in record:
        return "it has neither an 'llc_mean' nor an 'error'"
    for key, value in record.items():
        if key in TEXT_LISTS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return f"its {key!r} is {value!r:.60}, not a list of strings"
        elif key in NUMBER_LISTS:
            if not isinstance(value, list) or not all(_number_or_null(v) for v in value):
                return f"its {key!r} is {value!r:.60}, not a list of numbers"
        elif key == "behaviour":
            if not isinstance(value, dict) or not all(_number_or_null(v) for v in value.values()):
                return f"its 'behaviour' is {value!r:.60}, not an object of numbers"
        elif key not in TEXT_FIELDS and key != "sweep_settings" and not _number_or_null(value):
            return f"its {key!r} is {value!r:.60}, not a number"
    return None


# A sweep record's fields other than numbers (or null, where a value was not finite)
TEXT_FIELDS = {"checkpoint", "settings", "error"}
TEXT_LISTS = {"failed_checks", "warnings"}
NUMBER_LISTS = {"llc_per_chain", "diverged_chains"}


def _number_or_null(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def data_fingerprint(cfg) -> "dict | None":
    """The data file a run reads (a token file's absolute path, size and
    SHA-256), or None where the data is synthetic (defined by the seed)."""
    path = (cfg.task_args or {}).get("path") if cfg.task == "tokens" else None
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def check_same_data(manifest: dict, now: "dict | None", where: str) -> None:
    """Refuses to measure a run on data other than it was trained on."""
    then = manifest.get("data")
    if isinstance(then, dict) and now is not None and then.get("sha256") != now["sha256"]:
        raise RunFileError(f"{where}: the run was trained on {then.get('path')} (SHA-256 {str(then.get('sha256'))[:12]}),"
                           f" but its config now reads {now['path']} (SHA-256 {now['sha256'][:12]}); results on other "
                           "data would be mixed with its own, so nothing was measured")


def read_json(path: str):
    """A JSON file, or RunFileError naming it."""
    try:
        with open(path) as f:
            text = f.read()
    except UnicodeDecodeError:
        raise RunFileError(f"{path}: not a text file (llcfast reads JSON)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (only JSON is read, not YAML)" if path.endswith((".yaml", ".yml")) else ""
        raise RunFileError(f"{path}: not valid JSON{hint}: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None


def atomic_write_bytes(path: str, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it
    over ``path``: a reader never sees half a file, whatever kills us."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_through(path: str, write: Callable) -> None:
    """``write(file)`` into ``path`` atomically (a temporary file renamed over
    it, which replaces a link instead of following it)."""
    if os.path.islink(path):
        raise RunFileError(f"{path} is a symbolic link; llcfast does not write through links (remove it)")
    atomic_write_bytes(path, write)


def save_figure(fig, path: str, **kwargs) -> None:
    fmt = os.path.splitext(path)[1].lstrip(".")
    write_through(path, lambda f: fig.savefig(f, format=fmt, **kwargs))


def save_text(path: str, text: str) -> None:
    write_through(path, lambda f: f.write(text.encode()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: str, what: str):
    """Holds ``run_dir`` for this process: a second holder gets RunLocked
    naming the first; a lock left by a dead process on this host is taken
    over with a warning."""
    path = os.path.join(run_dir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": what}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            holder = _holder(path)
            same_host = holder.get("host") == me["host"]
            if same_host and is_step(holder.get("pid")) and not _alive(holder["pid"]):
                warnings.warn(f"{path}: taking over a stale lock of process {holder['pid']} ({holder.get('command')}),"
                              " which is no longer running", RuntimeWarning, stacklevel=3)
                os.unlink(path)
                continue
            raise RunLocked(f"{run_dir} is in use by `llcfast {holder.get('command', '?')}` (process "
                            f"{holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to finish, or if "
                            f"it is gone, delete {path}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        try:
            if _holder(path).get("pid") == me["pid"]:
                os.unlink(path)
        except OSError:
            pass


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
