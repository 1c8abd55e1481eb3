"""The one way mochi-hub writes state to disk: atomic files, safetensors for tensors, JSON for the rest.

- `atomic_write`: every file goes through a temporary sibling and a rename, so a crash never leaves a
  half-written file under the real name; files are readable as any other the user makes (the umask decides).
- State folders (training checkpoints, probe classifier states): written into `NAME.tmp/`, renamed to
  `NAME/` when complete; a `.tmp` folder is an interrupted save and is never read.
- Folders of files written as one (an export): `staged_files`, each file moved in only when all are written.
- A full disk (or quota) raises `DiskFullError` naming the file, and leaves no temporary file, `.tmp` folder or
  folder it made empty behind; the caller adds what survived (the last complete checkpoint).
- Optimizer, GradScaler and RNG states are split into tensors (safetensors) and plain values (JSON):
  nothing is ever pickled, so reading a state cannot run code.
A file that cannot be read raises `StateFileError`, naming the file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mochi_hub.errors import DiskFullError, InputError, OptionError, is_disk_full

STATE = "state.json"


class StateFileError(InputError):
    """A saved file that is missing, truncated or not what it should be; the message names it."""


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the mode a file made by this user gets (safetensors' writer alone would make it 0600)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)`, then rename tmp -> path. A write that fails leaves no temporary file; a full disk raises
    DiskFullError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid: two writers never share a temporary
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskFullError(f"disk full while writing {path}") from None
        raise
    return path


def append_line(path: str | Path, line: str) -> None:
    """One line appended to a log (metrics.jsonl); a full disk raises DiskFullError naming it (a torn last line is
    skipped by its readers)."""
    try:
        with Path(path).open("a") as handle:
            handle.write(line + "\n")
    except OSError as error:
        if is_disk_full(error):
            raise DiskFullError(f"disk full while writing {path}") from None
        raise


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateFileError(f"{path}: not readable JSON ({error})") from None


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return atomic_write(path, lambda p: save_file(cpu, p, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    try:
        return load_file(path)
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing") from None
    except (OSError, SafetensorError, ValueError) as error:
        raise StateFileError(f"{path}: not a readable safetensors file ({error})") from None


# --- optimizer, scaler and RNG states as tensors + JSON -------------------------------------------------


def split_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state_dict -> (tensors named "<param>.<name>", the rest as JSON-able values)."""
    tensors, values = {}, {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                values.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def join_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta.get("values", {}).items()}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's global RNGs (torch CPU and CUDA, Python, NumPy) as tensors + JSON. mochi-hub's own
    draws come from seeded generators; these cover what models and libraries draw (dropout, drop-path)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    values = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, values


def set_rng_state(tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- state folders ---------------------------------------------------------------------------------------


def _missing(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    return [p for p in (path, *path.absolute().parents) if not p.exists()]


def _remove_if_empty(folders: list[Path]) -> None:
    """Folders a failed block made, deepest first: each goes when nothing was written into it."""
    for folder in folders:
        with suppress(OSError):
            folder.rmdir()


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """The `.tmp` sibling a state folder is written into (created if needed; a stale attempt is overwritten). When the
    block fails (a full disk), it goes again, with the parents made for it that stay empty."""
    tmp = final.with_name(final.name + ".tmp")
    made = _missing(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(made[1:])
        raise


def publish(final: Path) -> Path:
    """Rename the complete `final.tmp/` to `final/` (replacing an older save of the same name)."""
    tmp = final.with_name(final.name + ".tmp")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def complete_folders(root: str | Path, prefix: str) -> list[Path]:
    """`root/<prefix>-<number>/` folders holding a state.json, oldest first; `.tmp` folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.glob(f"{prefix}-*")
        if p.is_dir() and not p.name.endswith(".tmp") and p.name[len(prefix) + 1 :].isdigit() and (p / STATE).is_file()
    ]
    return sorted(done, key=lambda p: int(p.name[len(prefix) + 1 :]))


def prune(root: str | Path, prefix: str, keep: int) -> None:
    """Remove interrupted saves and all but the newest `keep` complete folders."""
    root = Path(root)
    for stale in root.glob(f"{prefix}-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in complete_folders(root, prefix)[:-keep] if keep > 0 else complete_folders(root, prefix):
        shutil.rmtree(old, ignore_errors=True)


# --- output paths, checked before any work -------------------------------------------------------------


def ensure_writable_dir(path: str | Path, option: str) -> Path:
    """Create `path` if needed and prove it can be written, or raise OptionError naming the option."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"{option} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)  # a name of its own: ranks run this at once
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OptionError(f"{option} {path}: not writable ({error.strerror or error})") from None
    return path


@contextmanager
def output_dir(path: str | Path, option: str) -> Iterator[Path]:
    """`ensure_writable_dir` around a block: when the block fails and leaves the folders it made empty, they go
    again, so a start that is refused or fails leaves nothing behind."""
    made = _missing(Path(path))
    folder = ensure_writable_dir(path, option)
    try:
        yield folder
    except BaseException:
        _remove_if_empty(made)
        raise


@contextmanager
def staged_files(folder: str | Path, option: str) -> Iterator[Path]:
    """Files written as one set into `folder` (an export): into a hidden sibling first, each moved into `folder`
    (made if needed; other files in it are left alone) only when the block completes. When it fails, `folder` is as
    it was, or absent, and a full disk says so."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OptionError(f"{option} {folder}: is a file, not a folder")
    existed = folder.is_dir()
    with output_dir(folder if existed else folder.parent, option):
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier attempt, interrupted
        try:
            tmp.mkdir()
            yield tmp
            folder.mkdir(exist_ok=True)
            for path in sorted(tmp.iterdir()):
                os.replace(path, folder / path.name)
        except DiskFullError:
            kept = "its files are as they were" if existed else "nothing was left behind"
            raise DiskFullError(f"disk full while writing {folder}; {kept}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_writable_file(path: str | Path, option: str) -> Path:
    """A file `path` can be written later: its folder exists (created) and is writable, and it is no folder."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{option} {path}: is a folder, not a file")
    ensure_writable_dir(path.parent, option)
    return path
