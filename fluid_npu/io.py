"""Output directories, atomic writes and ``run.json``: how results are left on disk.

Nothing a run writes is ever half-written: files and whole directories are written to a temporary
sibling and renamed into place, so a crash leaves either the old state or the new one. Generic I/O,
at the bottom of the package's layers (DESIGN §2): any module may import it, it imports nothing of
the package but ``errors`` (and, in ``versions``, the package's version).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from fluid_npu.errors import ConfigError, DataError

RUN_FILE = "run.json"
FINAL_STAGING = ".staging-final"  # where every rank writes the final save before it is published


def prepare_output_dir(path: str | Path, name: str = "output_dir") -> Path:
    """Create ``path`` when needed and check it is writable; a ConfigError names it (as ``name``,
    the setting or flag it came from) otherwise."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{name} {str(out)!r} is a file, not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{name} {str(out)!r} is not writable ({exc.strerror or exc}); choose another "
            f"{name} or fix its permissions"
        ) from None
    return out


def check_output_file(path: str | Path, flag: str) -> None:
    """Before a long run: the file at ``path`` can be written (its folder made if needed), so a
    bad path fails at once, not after the work; a ConfigError names ``flag`` otherwise."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {str(target)!r} is a directory; give a file path")
    prepare_output_dir(target.resolve().parent, f"the folder of {flag}")


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: set straight back (once, at import,
    os.umask(mask)  # before any thread of ours writes files)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def open_atomic(path: str | Path) -> Iterator[TextIO]:
    """A text file to write that appears at ``path`` only when the block ends without an error
    (written to a temporary sibling, fsynced, renamed); on an error nothing is left behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; the result gets the mode any new file gets (the umask's)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, chunks: Iterable[str]) -> Path:
    """Write ``chunks`` to ``path`` through a temporary file, fsync, and an atomic rename."""
    with open_atomic(path) as fh:
        for chunk in chunks:
            fh.write(chunk)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename. A number that is not
    finite (a rate of ``inf``: all at once) is written ``null``: JSON has no Infinity or NaN, and
    strict readers refuse them."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
    write_text_atomic(path, (text, "\n"))


def first_missing(path: str | Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what creating ``path`` with
    its parents would make first), or None when ``path`` exists."""
    p = Path(os.path.abspath(path))  # (.. collapsed: the folders really made)
    if p.exists():
        return None
    while not p.parent.exists():
        p = p.parent
    return p


def remove_if_empty(path: str | Path, up_to: str | Path | None = None) -> None:
    """Remove the directory ``path`` if it exists and holds nothing (a run that failed early), and
    then each empty parent, up to and including ``up_to`` (the outermost one the run created:
    ``first_missing`` before it made ``path``)."""
    p = Path(os.path.abspath(path))
    top = None if up_to is None else Path(os.path.abspath(up_to))
    if top is not None and top != p and top not in p.parents:
        top = None  # (not an ancestor: only ``path`` itself may go)
    try:
        while p.is_dir() and not any(p.iterdir()):
            p.rmdir()
            if top is None or p == top:
                return
            p = p.parent
    except OSError:
        pass  # best effort: an empty directory left behind is harmless


def publish_dir(staging: Path, target: Path, last: list[str] | None = None) -> None:
    """Move every entry of ``staging`` into ``target`` by rename (same filesystem), then drop it.

    Entries named in ``last`` move after all others, so their presence marks a complete publish.
    """
    target.mkdir(parents=True, exist_ok=True)
    tail = set(last or ())
    items = sorted(staging.iterdir(), key=lambda p: (p.name in tail, p.name))
    for item in items:
        dest = target / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
    staging.rmdir()


def utf8_lines(file: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of ``file``, read a line at a time; a ``DataError``
    names the first line that is not UTF-8 text (its byte and column), a Latin-1 or GBK export's."""
    with file.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{file} line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); save the file as UTF-8"
                ) from None
            yield n, text


def safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a whole safetensors file (truncated, an unreadable header), or None:
    the header parses and the file is exactly as long as the header says (an interrupted copy or
    download shows here, before a loader fails deep inside with the bytes it lacks)."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes, no safetensors header)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"is truncated (header of {n} bytes, file of {size})"
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"has an unreadable safetensors header ({exc})"
    if not isinstance(header, dict):
        return "has an unreadable safetensors header (not a JSON object)"
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    if not all(isinstance(e, int) for e in ends):
        return "has an unreadable safetensors header (offsets that are not integers)"
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"is truncated ({size} bytes, its header describes {expected})"
    return None


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


_DISTRIBUTIONS = {  # module -> the distributions that install it
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "datasets": ("datasets",),
    "triton": ("triton", "triton-ascend", "pytorch-triton"),
    "deepspeed": ("deepspeed",),
}


def versions() -> dict[str, str]:
    """Versions of the packages a run depends on (torch_npu only when it is loaded)."""
    import sys

    import torch
    import transformers

    import fluid_npu

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fluid_npu": fluid_npu.__version__,
    }
    # read from the installed distributions, not by importing: importing peft or deepspeed only
    # to print a version loads bitsandbytes / an accelerator probe, which log notices
    for name, dists in _DISTRIBUTIONS.items():
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "unknown")
            continue
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    if "torch_npu" in sys.modules:
        out["torch_npu"] = getattr(sys.modules["torch_npu"], "__version__", "unknown")
    return out


def write_run_json(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``run.json`` with the given record plus versions and a timestamp."""
    payload = {"versions": versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    path = Path(output_dir) / RUN_FILE
    write_json_atomic(path, payload)
    return path
