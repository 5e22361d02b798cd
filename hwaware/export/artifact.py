"""The artifact container: a directory holding a manifest dict and named tensors, written atomically.

This layer knows nothing about models. :func:`write_artifact` stores a JSON manifest and a dict of
tensors (and, through a caller-supplied writer, an optional ``program.pt2``); the readers refuse
anything they cannot vouch for before handing data back.

Layout of format version 1::

    <path>/
      manifest.json          caller's fields + format, format_version, hwaware_version,
                             torch_version, files {name: {sha256, bytes}}, manifest_sha256
      weights.safetensors    the tensors (safetensors: a JSON header + raw bytes, no pickle)
      program.pt2            optional; only hashed here, loading it is the caller's business

Guarantees:

- Atomic publish. Everything is written and fsynced in a temp directory next to ``path`` (same
  filesystem), then renamed into place. Replacing an existing artifact uses an atomic directory
  swap (Linux ``renameat2(RENAME_EXCHANGE)``) where the filesystem has it, else moves the old one
  aside, renames the new one in and restores the old one on failure. A process killed at any
  point leaves at ``path`` either the previous artifact, intact, or nothing (only in the fallback,
  between its two renames; the previous artifact is then at ``<path>.hwaware-old-*`` and the
  "missing" error names it). A killed write leaves its ``.hwaware-tmp-*`` directory next to
  ``path``; the next write to the same ``path`` removes it. Each writer holds an ``flock`` on its
  temp directory while it works (the kernel drops it when the process dies, ``kill -9`` too), so
  only a directory no live process holds, and ten minutes old, is removed; where the filesystem
  has no ``flock``, one an hour old.
- Verified reads. :func:`read_manifest` checks the format name and version, the manifest's own
  hash (``manifest_sha256``, so an edited manifest is refused) and the size and sha256 of every
  listed file before returning; :func:`read_tensors` reads the weights into memory once and
  hashes and parses those bytes (never a file mapping the served model would keep depending on).
  Nothing is unpickled or executed; every refusal is an :class:`ArtifactError` naming the file and why.

The hashes detect corruption, truncation and edits made without re-hashing; they are not a
signature (anyone who can write the directory can re-hash it).
"""
from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import Tensor

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "PROGRAM_FILE",
    "ArtifactError",
    "write_artifact",
    "read_manifest",
    "read_tensors",
    "verify_artifact",
    "artifact_size_bytes",
]

FORMAT_NAME = "hwaware-artifact"
# the newest format this hwaware reads and writes. 2: the manifest may hold "tied_tensors" (entries
# stored once under another key), which a reader of format 1 would take for missing tensors. An
# artifact that needs nothing of format 2 is written as format 1, so older hwaware versions read it.
# 3: the manifest may hold "derived_rows" (a table's rows, not stored, derived at load from the int8
# layer its weight is tied to), which a reader of format 2 would take for missing tensors.
# Each artifact is written as the oldest format that holds everything it needs.
FORMAT_VERSION = 3
_FIELDS_OF_FORMAT = {2: ("tied_tensors",), 3: ("derived_rows",)}

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "program.pt2"

# Fields write_artifact adds; any of the same name in the caller's manifest are replaced.
_ADDED_FIELDS = ("format", "format_version", "hwaware_version", "torch_version", "files", "manifest_sha256")

_TMP_PREFIX = ".hwaware-tmp-"
_OLD_INFIX = ".hwaware-old-"
_STALE_TMP_SECONDS = 3600.0  # without flock: a temp directory this old is a dead writer's
# with flock: unlocked and this old. Not younger: a writer between mkdtemp and its lock, or one on
# another host of a shared filesystem whose flock is node-local (its weights may take minutes)
_UNLOCKED_TMP_SECONDS = 600.0
_CHUNK = 1 << 20
# names longer than this (bytes) are shortened in the temp and moved-aside names beside them: those
# add up to 22 bytes and a random suffix, and a name may have 255 (NAME_MAX)
_LONG_NAME = 200


class ArtifactError(ValueError):
    """An artifact cannot be written or read; the message names the file and the reason."""


# ------------------------------------------------------------------------------------------------
# primitives: hashing, canonical JSON, fsync, atomic directory swap
# ------------------------------------------------------------------------------------------------
def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical_json(obj: Any) -> bytes:
    # The form manifest_sha256 is computed over: key order and whitespace cannot change it.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(_canonical_json(body)).hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the directory entries ``a`` and ``b``; False where the OS/filesystem cannot.

    Linux ``renameat2(RENAME_EXCHANGE)`` (glibc >= 2.28, ext4/xfs/btrfs/tmpfs): there is no
    instant at which either name is missing, so a crash cannot lose the previous artifact.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _short_name(path: str) -> str:
    """``path``'s last component as the temp and moved-aside directories beside it name it: a long
    one shortened to a prefix and a hash, so that what those add still fits NAME_MAX."""
    name = os.fsencode(os.path.basename(path))
    if len(name) <= _LONG_NAME:
        return os.fsdecode(name)
    return f"{name[:64].decode('utf-8', 'ignore')}~{hashlib.sha256(name).hexdigest()[:16]}"


def _replaceable(path: str) -> bool:
    """Whether the directory a publish moved out of the way is what :func:`_check_target` allows
    replacing (with overwrite): an empty directory, or an artifact with nothing unlisted in it."""
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return True
    manifest = _unverified_manifest(path)
    return manifest is not None and manifest.get("format") == FORMAT_NAME and not unlisted_entries(path, manifest)


def _replaced_meanwhile(path: str) -> ArtifactError:
    return ArtifactError(f"{path}: was replaced by something other than an hwaware artifact while the new one was being "
                         f"written; it is left as it is and nothing was written at {path}")


def _publish(tmp: str, path: str, replacing: bool, overwrite: bool = True) -> None:
    """Move the finished directory ``tmp`` to ``path``. ``replacing``: :func:`_check_target` saw an
    artifact there (and overwrite was given); otherwise it saw nothing or an empty directory, and
    only those are replaced (``rename`` fails on a directory that is no longer empty, or a file),
    unless an artifact appeared there since and ``overwrite`` replaces it."""
    if not replacing or not os.path.lexists(path):
        try:
            os.rename(tmp, path)  # POSIX rename replaces an empty directory atomically, and nothing else
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            if not (overwrite and e.errno in (errno.ENOTEMPTY, errno.EEXIST) and _replaceable(path)):
                raise ArtifactError(f"{path}: something was written there while the artifact was being written "
                                    f"({e.strerror}); it is left as it is and nothing was written at {path}") from None
        # another writer's artifact appeared since the check: overwrite replaces it, as below
    if _exchange(tmp, path):
        if not _replaceable(tmp):  # what appeared there since the check is not ours to delete
            _exchange(tmp, path)
            raise _replaced_meanwhile(path)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous artifact
        return
    old = os.path.join(os.path.dirname(path), f"{_short_name(path)}{_OLD_INFIX}{secrets.token_hex(4)}")
    os.rename(path, old)
    if not _replaceable(old):
        os.rename(old, path)
        raise _replaced_meanwhile(path)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _try_lock(path: str) -> Optional[int]:
    """Take an exclusive ``flock`` on directory ``path`` and return the fd holding it.

    None where the platform or filesystem has no ``flock``; ``BlockingIOError`` where another open
    file holds it (another writer, alive: the kernel drops a dead process's locks).
    """
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK and the like
        os.close(fd)
        return None
    return fd


def _writer_alive(path: str) -> Optional[bool]:
    """Whether a live process holds temp directory ``path``'s lock; None where flock cannot tell."""
    try:
        fd = _try_lock(path)
    except BlockingIOError:
        return True
    if fd is None:
        return None
    os.close(fd)
    return False


def _remove_stale_tmp(parent: str, name: str) -> None:
    now = time.time()
    for d in glob.glob(os.path.join(glob.escape(parent), f"{_TMP_PREFIX}{glob.escape(_short_name(name))}-*")):
        try:
            age = now - os.lstat(d).st_mtime
            if os.path.islink(d) or not os.path.isdir(d) or age <= _UNLOCKED_TMP_SECONDS:
                continue  # young: never probed (the probe's lock would make its writer's own lock fail)
            alive = _writer_alive(d)
            if alive is False or alive is None and age > _STALE_TMP_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _versions() -> Dict[str, str]:
    hw = getattr(sys.modules.get("hwaware"), "__version__", None)
    if hw is None:
        try:
            from hwaware import __version__ as hw  # lazy: hwaware/__init__ may import this module
        except Exception:
            from importlib.metadata import version

            hw = version("hwaware")
    return {"hwaware_version": str(hw), "torch_version": str(torch.__version__)}


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _unverified_manifest(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """``path``'s ``manifest.json`` as a JSON object, unverified; None where there is none to read."""
    try:
        with open(os.path.join(path, MANIFEST_FILE), "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: UnicodeDecodeError and JSONDecodeError too
        return None
    return manifest if isinstance(manifest, dict) else None


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``manifest.json`` of this format (unverified: what export may replace)."""
    manifest = _unverified_manifest(path)
    return manifest is not None and manifest.get("format") == FORMAT_NAME


def _check_target(path: str, overwrite: bool) -> bool:
    """Refuse to clobber anything at ``path`` that is not a previous artifact or an empty dir.
    Returns whether an artifact is there (to be replaced)."""
    if not os.path.lexists(path):
        return False
    if os.path.islink(path):
        raise ArtifactError(f"{path}: is a symlink; refusing to replace it (pass the real directory)")
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: exists and is not a directory; refusing to overwrite it")
    if not os.listdir(path):
        return False
    manifest = _unverified_manifest(path)
    if manifest is None or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{path}: exists, is not empty and is not an hwaware artifact (no {MANIFEST_FILE} with "
            f"format {FORMAT_NAME!r}); refusing to overwrite it"
        )
    if not overwrite:
        raise ArtifactError(f"{path}: an artifact already exists there and overwrite=False")
    foreign = unlisted_entries(path, manifest)
    if foreign:  # replacing the directory would delete them with the old artifact
        raise ArtifactError(
            f"{path}: holds an artifact and also {', '.join(map(repr, foreign[:5]))}"
            f"{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}, which are not part of it (the manifest "
            "does not list them); replacing the artifact would delete them. Move them out, or export elsewhere")
    return True


def nearest_existing_parent(path: str | os.PathLike) -> str:
    """The closest existing ancestor of ``path`` (what creating its missing folders would start from)."""
    parent = os.path.dirname(os.path.abspath(os.fsdecode(path)))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_target(path: str | os.PathLike, overwrite: bool = True) -> None:
    """What :func:`write_artifact` will refuse at ``path``, checked before any work: an empty path,
    something there that is not an earlier artifact or an empty directory (or an earlier artifact,
    with ``overwrite=False``), or a parent that is no directory or cannot be written.

    Raises:
        ArtifactError: naming ``path`` and the reason.
    """
    if not os.fsdecode(path):  # abspath("") is the working directory: never a target by accident
        raise ArtifactError("path '' is empty; expected the artifact's directory")
    path = os.path.abspath(os.fsdecode(path))
    _check_target(path, overwrite=overwrite)
    parent = nearest_existing_parent(path)
    if not os.path.isdir(parent):
        raise ArtifactError(f"{path}: cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"{path}: cannot be created: no write permission in {parent}")


def _prepare_tensors(tensors: Mapping[str, Tensor], path: str) -> Dict[str, Tensor]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> Tensor, got {type(tensors).__name__}")
    out: Dict[str, Tensor] = {}
    storages = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ArtifactError(f"{path}: tensors[{name!r}] has layout {t.layout}; only dense tensors can be stored")
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (tied weights): give each its own copy.
        key = t.untyped_storage().data_ptr()
        if t.numel() and key in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _umask() -> int:
    """This process's umask (read without changing it where /proc says it; else set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_modes(tmp: str) -> None:
    """The modes a plain ``mkdir`` and ``open`` give under the umask (usually 0755 and 0644): the
    temporary directory is created 0700 (``mkdtemp``), and a writer may create its file 0600, which
    left a published artifact unreadable by a serving user other than the exporter."""
    mask = _umask()
    for fname in os.listdir(tmp):
        os.chmod(os.path.join(tmp, fname), 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)


def write_artifact(
    path: str | os.PathLike,
    manifest: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    *,
    program_writer: Optional[Callable[[str], Any]] = None,
    overwrite: bool = True,
) -> Dict[str, Any]:
    """Write an artifact directory at ``path`` atomically and return the manifest as written.

    Example::

        m = write_artifact("out/ctr-int8", {"layers": {...}, "regression": {...}},
                           {"mlp.0.weight_q": w_int8, "mlp.0.scale": scale},
                           program_writer=lambda p: torch.export.save(ep, p))

    Args:
        path: the artifact directory. It may not exist yet, be an empty directory, or hold a
            previous artifact (replaced atomically when ``overwrite``).
        manifest: JSON-serialisable dict of the caller's fields (``layers``, ``regression``, ...).
            The fields listed in the module docstring are added; same-named keys are replaced.
        tensors: name -> dense tensor; stored in ``weights.safetensors`` (moved to CPU, made
            contiguous; dtypes preserved).
        program_writer: called as ``program_writer(tmp_file_path)`` to write ``program.pt2``
            into the temp directory; it must create that file.
        overwrite: replace a previous artifact at ``path``.

    Raises:
        ArtifactError: ``path`` holds something other than an artifact or an empty directory;
            an artifact exists and ``overwrite`` is False; ``manifest`` is not JSON-serialisable;
            ``program_writer`` wrote no file or a subdirectory.
        TypeError: ``manifest`` is not a dict or ``tensors`` is not a dict of name -> Tensor.
    """
    from safetensors.torch import save_file

    path = os.path.abspath(os.fsdecode(path))
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    try:
        # Round-trip through JSON so the returned dict equals what read_manifest will return
        # (tuples become lists) and the hash is computed over exactly that.
        body: Dict[str, Any] = json.loads(json.dumps(dict(manifest), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: manifest is not JSON-serialisable (NaN/inf are not allowed): {e}") from e
    for k in _ADDED_FIELDS:
        body.pop(k, None)
    tensors = _prepare_tensors(tensors, path)

    _check_target(path, overwrite)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp(parent, name)

    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{_TMP_PREFIX}{_short_name(name)}-")
    try:
        lock = _try_lock(tmp)  # held until we return: a later writer sees this directory is live
    except BlockingIOError:  # another process probing it this instant: it only ever probes old ones
        lock = None
    writing = WEIGHTS_FILE  # what an OSError (a full disk) was writing
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        if program_writer is not None:
            writing = PROGRAM_FILE
            program_writer(os.path.join(tmp, PROGRAM_FILE))
            if not os.path.isfile(os.path.join(tmp, PROGRAM_FILE)):
                raise ArtifactError(f"{path}: program_writer did not write {PROGRAM_FILE}")

        files: Dict[str, Dict[str, Any]] = {}
        for fname in sorted(os.listdir(tmp)):
            fpath = os.path.join(tmp, fname)
            if fname == MANIFEST_FILE or os.path.islink(fpath) or not os.path.isfile(fpath):
                raise ArtifactError(f"{path}: unexpected entry {fname!r} written into the artifact")
            _fsync_file(fpath)
            files[fname] = {"sha256": _sha256_file(fpath), "bytes": os.path.getsize(fpath)}

        writing = MANIFEST_FILE
        version = max([1] + [v for v, fields in _FIELDS_OF_FORMAT.items() if any(k in body for k in fields)])
        body.update(format=FORMAT_NAME, format_version=version, files=files, **_versions())
        body["manifest_sha256"] = _manifest_hash(body)
        mpath = os.path.join(tmp, MANIFEST_FILE)
        with open(mpath, "w", encoding="utf-8") as f:
            json.dump(body, f, sort_keys=True, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _set_modes(tmp)

        replacing = _check_target(path, overwrite)  # again: something may have appeared while we wrote
        writing = None
        _publish(tmp, path, replacing, overwrite)
        _fsync_dir(parent)
    except OSError as e:  # a full disk, a quota: say where, and that nothing changed at path
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"{path}: {f'writing {writing}' if writing else 'moving the new artifact into place'} failed "
                            f"({e.strerror or e}); nothing was written at {path}"
                            f"{' and the previous artifact there is intact' if is_artifact(path) else ''}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    return body


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _missing_hint(path: str) -> str:
    old = sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(path)), glob.escape(_short_name(path)) + _OLD_INFIX + "*")))
    if old:
        return f" (an interrupted overwrite left the previous artifact at {old[-1]}; rename it back)"
    return ""


def read_manifest(path: str | os.PathLike) -> Dict[str, Any]:
    """Return the manifest of the artifact at ``path`` after verifying it and every listed file.

    Checks, in order: ``path`` is a directory with ``manifest.json``; the manifest is a JSON
    object; its ``format`` is ours; its ``format_version`` is one this hwaware reads; its
    ``manifest_sha256`` matches its content; every file in ``files`` exists with the recorded
    byte size and sha256; a ``program.pt2`` in the directory is one the manifest lists (one
    copied in afterwards would pass for verified, and ``torch.export.load`` unpickles it). Other
    files the manifest does not list are not part of the artifact: ignored (``hwaware inspect``
    names them). Nothing in the artifact is unpickled or executed.

    Raises:
        ArtifactError: any check fails; the message names the file and the reason.
    """
    path = os.fsdecode(path)
    try:
        return _read_manifest(path, hash_weights=True)
    except ArtifactError:
        # an export may have replaced the artifact (an atomic directory swap) between reading its
        # manifest and hashing its files: read it once more; a damaged artifact fails again
        return _read_manifest(path, hash_weights=True)


def _unique_keys(pairs: list) -> Dict[str, Any]:
    """A JSON object whose keys are unique: a duplicate is read as the last value here and as the
    first by other parsers, so the hash would vouch for two different manifests."""
    obj: Dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"key {k!r} appears twice in one object")
        obj[k] = v
    return obj


def _link_error(fpath: str) -> ArtifactError:
    """An artifact file that is a symbolic link: export writes regular files, and a link reads
    whatever it points to. (A model hub snapshot or a ConfigMap volume lays files out as links: a
    dereferenced copy serves.)"""
    return ArtifactError(f"{fpath}: a symbolic link ({os.readlink(fpath)}), not a regular file; export writes none. "
                         f"Serve a dereferenced copy of the directory (cp -rL {os.path.dirname(fpath)} DEST)")


def _read_manifest(path: str, hash_weights: bool) -> Dict[str, Any]:
    if not os.path.lexists(path):
        raise ArtifactError(f"{path}: no such artifact (path does not exist){_missing_hint(path)}")
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not an hwaware artifact (not a directory)")
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path}: not an hwaware artifact (no {MANIFEST_FILE})")
    if os.path.islink(mpath):  # as for the weights: export writes regular files, a link reads elsewhere
        raise _link_error(mpath)
    try:
        with open(mpath, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ArtifactError(f"{mpath}: cannot be read ({e.strerror or e})") from e
    try:
        manifest = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{mpath}: {MANIFEST_FILE} is not valid JSON ({e})") from e
    except RecursionError:
        raise ArtifactError(f"{mpath}: {MANIFEST_FILE} nests too deeply to be a manifest") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath}: {MANIFEST_FILE} is not a JSON object")

    fmt = manifest.get("format")
    if fmt != FORMAT_NAME:
        raise ArtifactError(f"{mpath}: not an hwaware artifact (format {fmt!r}, expected {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: written by a newer hwaware (format {version}); this hwaware reads format "
            f"{FORMAT_VERSION}; upgrade hwaware"
        )
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: unsupported format_version {version!r}; this hwaware reads formats 1 to {FORMAT_VERSION}"
        )
    for newer, fields in _FIELDS_OF_FORMAT.items():  # (a reader of the stated format would misread them)
        if version < newer and any(k in manifest for k in fields):
            raise ArtifactError(f"{mpath}: format_version {version} with format {newer}'s {[k for k in fields if k in manifest]}")

    recorded = manifest.get("manifest_sha256")
    try:
        actual = _manifest_hash(manifest)
    except ValueError:  # NaN/inf smuggled in: not something write_artifact produces
        actual = None
    if recorded != actual:
        raise ArtifactError(
            f"{mpath}: {MANIFEST_FILE} was edited after export (manifest_sha256 does not match its content)"
        )

    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise ArtifactError(f"{mpath}: 'files' does not list {WEIGHTS_FILE}")
    for fname, entry in files.items():
        _verify_file(path, fname, entry, hash_it=hash_weights or fname != WEIGHTS_FILE)
    if PROGRAM_FILE not in files and os.path.lexists(os.path.join(path, PROGRAM_FILE)):
        raise ArtifactError(f"{os.path.join(path, PROGRAM_FILE)}: not listed in {MANIFEST_FILE} (this export wrote no "
                            f"program; the file was added afterwards and nothing vouches for it): remove it, or re-export "
                            f"with example_inputs")
    return manifest


def unlisted_entries(path: str | os.PathLike, manifest: Mapping[str, Any]) -> list:
    """Names in the artifact directory that are neither ``manifest.json`` nor a file the manifest
    lists: not part of the artifact (never read, not counted in its size)."""
    files = manifest.get("files")
    listed = set(files) if isinstance(files, Mapping) else set()
    return sorted(n for n in os.listdir(os.fsdecode(path)) if n != MANIFEST_FILE and n not in listed)


def _verify_file(path: str, fname: str, entry: Any, hash_it: bool = True) -> None:
    fpath = os.path.join(path, fname)
    if (
        not isinstance(fname, str)
        or fname in ("", ".", "..", MANIFEST_FILE)
        or os.path.basename(fname) != fname
        or "/" in fname
        or "\\" in fname
    ):
        raise ArtifactError(f"{os.path.join(path, MANIFEST_FILE)}: invalid file name {fname!r} in 'files'")
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
        raise ArtifactError(f"{os.path.join(path, MANIFEST_FILE)}: entry for {fname!r} lacks sha256/bytes")
    if not os.path.lexists(fpath):
        raise ArtifactError(f"{fpath}: listed in {MANIFEST_FILE} but missing")
    if os.path.islink(fpath):
        raise _link_error(fpath)
    if not os.path.isfile(fpath):
        raise ArtifactError(f"{fpath}: not a regular file")
    size = os.path.getsize(fpath)
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "has extra bytes"
        raise ArtifactError(f"{fpath}: {what}: {size} bytes, {MANIFEST_FILE} records {entry['bytes']}")
    if hash_it:
        try:
            digest = _sha256_file(fpath)
        except OSError as e:
            raise ArtifactError(f"{fpath}: cannot be read ({e.strerror or e})") from e
        _check_digest(fpath, digest, entry["sha256"])


def _check_digest(fpath: str, digest: str, recorded: str) -> None:
    if digest != recorded:
        raise ArtifactError(
            f"{fpath}: corrupted or tampered: sha256 {digest[:16]}... does not match the "
            f"{recorded[:16]}... recorded in {MANIFEST_FILE}"
        )


def read_tensors(
    path: str | os.PathLike,
    manifest: Optional[Mapping[str, Any]] = None,
    device: str | torch.device = "cpu",
) -> Dict[str, Tensor]:
    """Return the tensors of the artifact at ``path``, loaded onto ``device``, after verification.

    The manifest and every other listed file are verified first (:func:`read_manifest`'s
    checks); a ``manifest`` passed in must equal the verified one, which catches an artifact
    replaced between the caller's read and this one. ``weights.safetensors`` is then read into
    memory once, and those bytes are what is hashed against the manifest and what the tensors
    are: no file mapping, so replacing or truncating the file afterwards cannot change (or,
    with SIGBUS, crash) a model being served, and nothing changes between the check and the use.
    The tensors share that one buffer: loading costs one copy of the weights. safetensors
    only, parsed here (JSON header + raw bytes): no pickle.

    Raises:
        ArtifactError: verification fails, ``manifest`` differs from the one on disk, or the
            safetensors header is malformed.
    """
    path = os.fsdecode(path)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}; expected a torch device ('cpu', 'cuda', 'cuda:N')") from e
    verified, tensors = read_verified(path)
    if manifest is not None and dict(manifest) != verified:
        raise ArtifactError(f"{os.path.join(path, MANIFEST_FILE)}: changed since the manifest passed in was read")
    return tensors if device.type == "cpu" else {k: t.to(device) for k, t in tensors.items()}


def read_verified(path: str | os.PathLike):
    """``(manifest, CPU tensors)`` of the artifact at ``path``, every file read and hashed once
    (:func:`read_tensors` says how the weights are read)."""
    path = os.fsdecode(path)
    try:
        return _read_verified_once(path)
    except ArtifactError:
        # an export may have replaced the artifact (an atomic directory swap) between reading its
        # manifest and its weights: read it once more, whole; a damaged artifact fails again
        return _read_verified_once(path)


def _read_verified_once(path: str):
    verified = _read_manifest(path, hash_weights=False)
    wpath = os.path.join(path, WEIGHTS_FILE)
    entry = verified["files"][WEIGHTS_FILE]
    try:
        # O_NONBLOCK: a FIFO swapped in since the check would block the read; fstat then refuses it
        fd = os.open(wpath, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ArtifactError(f"{wpath}: not a regular file")
            buf = bytearray(entry["bytes"])
            got = f.readinto(buf)
            more = f.read(1)
    except OSError as e:
        if os.path.islink(wpath):
            raise _link_error(wpath) from None
        raise ArtifactError(f"{wpath}: cannot be read ({e.strerror or e})") from e
    if got != entry["bytes"] or more:  # the file changed size since it was checked
        raise ArtifactError(f"{wpath}: {'truncated' if got < entry['bytes'] else 'has extra bytes'} while being read "
                            f"({MANIFEST_FILE} records {entry['bytes']} bytes)")
    _check_digest(wpath, hashlib.sha256(buf).hexdigest(), entry["sha256"])
    return verified, _parse_safetensors(buf, wpath)


# safetensors' dtype names (those this torch has)
_ST_DTYPES = {name: dt for name, dt in {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None), "U64": getattr(torch, "uint64", None),
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None), "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
}.items() if dt is not None}


def _parse_safetensors(buf: bytearray, wpath: str) -> Dict[str, Tensor]:
    """The tensors of a safetensors file held in ``buf``, as views of it (a tensor whose address is
    not a multiple of its element size, which safetensors' writer never produces, is copied).
    Checked as safetensors checks a file: a JSON object header, every entry's dtype, shape and
    byte range, and the ranges tiling the data section exactly (no gap, no overlap)."""
    import sys

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{wpath}: safetensors header unreadable ({why})")

    if sys.byteorder != "little":
        raise ArtifactError(f"{wpath}: this reader serves little-endian hosts only (safetensors data is little-endian)")
    if len(buf) < 8:
        raise bad(f"{len(buf)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise bad(f"header length {n} runs past the end of the file ({len(buf)} bytes)")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    start, size = 8 + n, len(buf) - 8 - n
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr() if len(buf) else 0
    spans, out = [], {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = _ST_DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None, e["shape"], e["data_offsets"]
        if dtype is None:
            raise bad(f"entry {name!r} has dtype {e['dtype']!r}; expected one of {sorted(_ST_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
            raise bad(f"entry {name!r} has shape {shape!r}; expected a list of non-negative ints")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size):
            raise bad(f"entry {name!r} has data_offsets {offsets!r}; expected [begin, end] within the {size} data bytes")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != numel * itemsize:
            raise bad(f"entry {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {e['dtype']} "
                      f"({numel * itemsize} expected)")
        spans.append((offsets[0], offsets[1], name))
        at = start + offsets[0]
        try:
            if numel == 0:
                out[name] = torch.empty(shape, dtype=dtype)
            elif (base + at) % itemsize:
                raw = torch.frombuffer(buf, dtype=torch.uint8, count=numel * itemsize, offset=at).clone()
                out[name] = raw.view(dtype).reshape(shape)
            else:
                out[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=at).reshape(shape)
        except (TypeError, RuntimeError, OverflowError) as err:
            raise bad(f"entry {name!r} with shape {shape}: {type(err).__name__}: {str(err)[:200]}") from None
        if dtype == torch.bool and numel and int(torch.frombuffer(buf, dtype=torch.uint8, count=numel, offset=at).max()) > 1:
            raise bad(f"entry {name!r} is BOOL with a byte other than 0 or 1")  # torch would read it as neither
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise bad(f"entry {name!r} starts at data byte {begin}, expected {end} (the tensors must tile the data with "
                      f"no {'overlap' if begin < end else 'gap'})")
        end = stop
    if end != size:
        raise bad(f"the tensors end at data byte {end} of {size}: {size - end} trailing bytes")
    return out


def verify_artifact(path: str | os.PathLike) -> Dict[str, Any]:
    """Fully verify the artifact at ``path`` and return its manifest.

    :func:`read_manifest`'s checks, plus parsing ``weights.safetensors`` as :func:`hwaware.load` does
    (the same reader: what one refuses, the other does; it holds the file in memory while it checks
    it). ``program.pt2`` is hashed, never loaded. Whether the tensors fit the model is load's check.

    Raises:
        ArtifactError: any check fails; the message names the file and the reason.
    """
    manifest, _ = read_verified(path)
    return manifest


def artifact_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the artifact: ``manifest.json`` and the files it lists (anything else in
    the directory is not part of it); every regular file in the directory when the manifest
    cannot be read.

    Raises:
        ArtifactError: ``path`` is not a directory.
    """
    path = os.fsdecode(path)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not an hwaware artifact (not a directory)")
    files = (_unverified_manifest(path) or {}).get("files")
    names = [MANIFEST_FILE, *files] if isinstance(files, dict) else None
    if names is None:
        names = [os.path.relpath(os.path.join(root, n), path) for root, _dirs, ns in os.walk(path) for n in ns]
    total = 0
    for n in names:
        p = os.path.join(path, n)
        if isinstance(n, str) and os.path.isfile(p) and not os.path.islink(p):
            total += os.path.getsize(p)
    return total
