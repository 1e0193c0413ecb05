"""Atomic, safe outputs: write to a temporary path beside the target, rename when complete.

A crash or a bad input therefore never leaves a half-written file or folder behind. An output folder
gets a marker (`.lfm-fast.json`: the command and version that wrote it); an existing non-empty folder is
replaced only with `overwrite=True` and only if it carries that marker, is not the working directory (or
above it) and holds no training run: like git and rsync, we never delete what we did not create.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from lfm_fast.errors import InputError

MARKER = ".lfm-fast.json"


def cache_dir(*parts: str) -> str:
    """A folder under the user's cache ($LFM_FAST_CACHE, default ~/.cache/lfm-fast): engines, timing caches."""
    return os.path.join(os.environ.get("LFM_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lfm-fast")), *parts)


def umask_mode(mode: int = 0o777) -> int:
    """`mode` as the process umask lets it be (tempfile makes 0700 folders; runs live on shared storage)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_marker(folder: str, command: str) -> None:
    from lfm_fast import __version__

    write_json(os.path.join(folder, MARKER), {"tool": "lfm-fast", "command": command, "version": __version__})


def check_out_dir(path: str, overwrite: bool = False, command: str | None = None, flag: str = "--out") -> None:
    """Refuse (InputError) an output folder we may not replace; call it before any work (and `atomic_dir` calls
    it again before committing). `--overwrite` replaces only a folder written by the same `command`."""
    real = os.path.realpath(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"{flag} {path} is a broken symbolic link")
    parent = os.path.dirname(real)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
    if os.path.exists(real) and not os.path.isdir(real):
        raise InputError(f"{flag} {path} is a file; expected a folder (new or empty)")
    cwd = os.path.realpath(os.getcwd())
    if real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise InputError(f"{flag} {path} is the working directory or a folder above it; name a new folder, e.g. {flag} runs/out")
    if not os.path.isdir(real) or not os.listdir(real):
        return
    if not overwrite:
        raise InputError(f"{flag} {path} exists and is not empty; choose a new folder, or pass --overwrite to replace "
                         f"a folder lfm-fast wrote")
    if os.path.isdir(os.path.join(real, "checkpoints")):
        raise InputError(f"--overwrite {flag} {path}: it holds a training run (checkpoints/); refusing to replace it")
    marker = read_marker(real)
    if marker is None:
        raise InputError(f"--overwrite {flag} {path}: it was not written by lfm-fast (no {MARKER}); refusing to replace it")
    if command is not None and marker.get("command") != command:
        raise InputError(f"--overwrite {flag} {path}: it was written by `lfm-fast {marker.get('command')}`, not "
                         f"`lfm-fast {command}`; refusing to replace it")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary file path; on success it replaces `path`, on error it is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, umask_mode(0o666))  # some writers (safetensors) create 0600 files
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))  # the rename itself
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_path(path: str) -> None:
    """Flush a file's data, or a folder's entries (a rename), to the disk: a crash after it cannot undo the write."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


@contextlib.contextmanager
def out_lock(out: str, flag: str = "--out"):
    """An advisory lock on `out` for a whole run (fcntl.flock): a second process that would write there gets one line
    naming the first one's PID. It is held on a file beside `out` (`.NAME.lfm-fast.lock`: `out` may not exist yet, and
    a command may replace it whole), dies with its process (kill -9 too: a killed run never blocks the next), and the
    file is removed at the end, with the folders made for it if they stayed empty. Where no folder can be made there
    (a file in the way) there is no lock: the command itself refuses such an --out."""
    import fcntl

    parent, name = os.path.split(os.path.abspath(out))
    made = []  # the missing folders above `out`, made here, removed at the end if they stay empty
    d = parent
    while not os.path.exists(d):
        made.insert(0, d)
        d = os.path.dirname(d)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError:
        yield
        return
    path = os.path.join(parent, f".{name}.lfm-fast.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"{flag} {out} is in use by another lfm-fast run (PID {pid}); wait for it to end, or "
                             f"choose another {flag}") from None
        try:  # the file its last holder removed between our open and our lock is not the lock: take the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a waiting process then finds no file, or a new one
        os.close(fd)
        for d in reversed(made):
            try:
                os.rmdir(d)
            except OSError:  # not empty (the run wrote there), or gone
                break


@contextlib.contextmanager
def atomic_dir(path: str, command: str, overwrite: bool = False):
    """Yield a temporary folder; on success it gets the marker of `command` and takes the place of `path`
    (replacing an older one only as `check_out_dir` allows)."""
    check_out_dir(path, overwrite, command)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        os.chmod(tmp, umask_mode())
        yield tmp
        write_marker(tmp, command)
        check_out_dir(path, overwrite, command)  # again: something may have appeared at `path` meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def image_grid(images, nrow: int | None = None):
    """uint8 (N, H, W, 3) → one uint8 grid image with a 2-pixel border, `nrow` images per row."""
    import math

    import numpy as np

    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, array, upscale: int = 1, row_labels: list[str] | None = None) -> None:
    """Save a uint8 (H, W, 3) array as PNG (atomically), optionally enlarged with nearest-neighbour.
    `row_labels`: one name per row of an `image_grid`, written in a white margin at the row starts."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(array)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    if row_labels:
        font = ImageFont.load_default(size=14)
        margin = 12 + max(int(ImageDraw.Draw(img).textlength(t, font=font)) for t in row_labels)
        labelled = Image.new("RGB", (img.width + margin, img.height), "white")
        labelled.paste(img, (margin, 0))
        draw, row_h = ImageDraw.Draw(labelled), img.height / len(row_labels)
        for r, text in enumerate(row_labels):
            draw.text((6, (r + 0.5) * row_h), text, fill="black", font=font, anchor="lm")
        img = labelled
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def portable_path(spec: str, base: str) -> str:
    """A local path is stored relative to `base` (so a run folder can move); anything else (a hub id) as is."""
    return os.path.relpath(os.path.abspath(spec), os.path.abspath(base)) if os.path.isdir(spec) else spec


def resolve_path(spec: str, base: str) -> str:
    """Inverse of `portable_path`: a path relative to `base` if that exists, else `spec` unchanged."""
    candidate = os.path.normpath(os.path.join(base, spec))
    return candidate if spec and os.path.isdir(candidate) else spec
