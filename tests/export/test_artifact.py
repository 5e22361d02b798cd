"""Artifact container: round trip, every refusal, atomic overwrite, and a real SIGKILLed export."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import hwaware
from hwaware.export import artifact as A
from hwaware.export import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ArtifactError,
    artifact_size_bytes,
    read_manifest,
    read_tensors,
    verify_artifact,
    write_artifact,
)

ADDED = {"format", "format_version", "hwaware_version", "torch_version", "files", "manifest_sha256"}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w_q": torch.randint(-128, 128, (16, 8), dtype=torch.int8, generator=g),
        "packed": torch.randint(0, 256, (16, 4), dtype=torch.uint8, generator=g),
        "scale": torch.rand(16, generator=g).half(),
        "bias": torch.randn(16, generator=g),
    }


def _write(path, manifest=None, tensors=None, **kw):
    return write_artifact(path, {"layers": {"fc": {"scheme": "w8"}}} if manifest is None else manifest,
                          _tensors() if tensors is None else tensors, **kw)


def _rehash(path, edit):
    """Apply ``edit(manifest)`` and re-hash, so only the check under test can trip."""
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    edit(m)
    m.pop("manifest_sha256", None)
    m["manifest_sha256"] = hashlib.sha256(
        json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    with open(mpath, "w") as f:
        json.dump(m, f)


def _tmp_dirs(parent):
    return glob.glob(os.path.join(str(parent), ".hwaware-tmp-*"))


# ------------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------------
def test_round_trip_preserves_tensors_dtypes_and_manifest(tmp_path):
    path = tmp_path / "art"
    tensors = _tensors()
    tensors["bf16"] = torch.randn(3, 5).bfloat16()
    tensors["flags"] = torch.tensor([True, False])
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["transposed"] = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()  # non-contiguous
    user = {"layers": {"fc": {"scheme": "w8", "shape": (16, 8)}}, "fp32_bytes": 1234, "format": "ignored"}
    written = write_artifact(path, user, tensors)

    got = read_tensors(path)
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t), k

    m = read_manifest(path)
    assert m == written == verify_artifact(path)
    assert ADDED <= set(m)
    # format 1: nothing of format 2 (tied_tensors) in it, so an older hwaware reads it
    assert m["format"] == FORMAT_NAME == "hwaware-artifact" and m["format_version"] == 1 and FORMAT_VERSION == 3
    assert m["hwaware_version"] == hwaware.__version__ and m["torch_version"] == torch.__version__
    assert m["layers"] == {"fc": {"scheme": "w8", "shape": [16, 8]}} and m["fp32_bytes"] == 1234
    assert set(m["files"]) == {"weights.safetensors"}
    w = path / "weights.safetensors"
    assert m["files"]["weights.safetensors"] == {
        "sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "bytes": w.stat().st_size}
    assert artifact_size_bytes(path) == w.stat().st_size + (path / "manifest.json").stat().st_size
    assert not _tmp_dirs(tmp_path)
    # the manifest on disk is sorted, indented JSON
    text = (path / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_published_artifact_has_the_modes_mkdir_and_open_give(tmp_path, umask):
    # mkdtemp makes the directory 0700 and a writer may create its file 0600 (torch.export.save's
    # program did here): the artifact was unreadable to a serving user other than the exporter
    def writer(p):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"program")
        os.close(fd)

    old = os.umask(umask)
    try:
        write_artifact(tmp_path / "art", {}, _tensors(), program_writer=writer)
    finally:
        os.umask(old)
    assert (tmp_path / "art").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in ("manifest.json", "weights.safetensors", "program.pt2"):
        assert (tmp_path / "art" / f).stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_tied_tensors_and_program_writer(tmp_path):
    w = torch.randn(4, 4)
    path = tmp_path / "art"
    m = write_artifact(path, {}, {"a": w, "b": w, "row": w[1]},
                       program_writer=lambda p: open(p, "wb").write(b"not really a program"))
    assert set(m["files"]) == {"weights.safetensors", "program.pt2"}
    assert m["files"]["program.pt2"]["bytes"] == 20
    got = read_tensors(path)
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w) and torch.equal(got["row"], w[1])


def test_read_tensors_refuses_stale_manifest(tmp_path):
    path = tmp_path / "art"
    m = _write(path)
    _write(path, manifest={"layers": {}})
    with pytest.raises(ArtifactError, match=r"manifest.json: changed since"):
        read_tensors(path, manifest=m)
    assert read_tensors(path, manifest=read_manifest(path)).keys() == _tensors().keys()


def test_reading_never_unpickles(tmp_path, monkeypatch):
    path = tmp_path / "art"
    _write(path, program_writer=lambda p: torch.save({"x": 1}, p))  # a pickle-based file is only hashed

    def boom(*a, **k):
        raise AssertionError("reading an artifact must not unpickle")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)
    assert verify_artifact(path)["files"]["program.pt2"]["bytes"] > 0
    assert torch.equal(read_tensors(path)["w_q"], _tensors()["w_q"])


# ------------------------------------------------------------------------------------------------
# refusals on read
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def art(tmp_path):
    path = tmp_path / "art"
    _write(path, program_writer=lambda p: open(p, "wb").write(b"\x00" * 64))
    return path


def _flip_byte(p, offset):
    data = bytearray(p.read_bytes())
    data[offset] ^= 0xFF
    p.write_bytes(bytes(data))


def test_refuses_missing_path_file_and_non_artifact_dirs(tmp_path):
    with pytest.raises(ArtifactError, match=r"nope: no such artifact"):
        read_manifest(tmp_path / "nope")
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"file.bin: not an hwaware artifact \(not a directory\)"):
        verify_artifact(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"empty: not an hwaware artifact \(no manifest.json\)"):
        read_tensors(tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "weights.safetensors").write_bytes(os.urandom(100))
    (junk / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match=r"junk: not an hwaware artifact \(no manifest.json\)"):
        verify_artifact(junk)


def test_refuses_manifest_not_json_or_wrong_format(art):
    m = art / "manifest.json"
    m.write_text('{"format": "hwaware-artifact", ')
    with pytest.raises(ArtifactError, match=r"manifest.json: manifest.json is not valid JSON"):
        read_manifest(art)
    m.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"manifest.json: manifest.json is not a JSON object"):
        read_manifest(art)
    m.write_text('{"format": "onnx"}')
    with pytest.raises(ArtifactError, match=r"manifest.json: not an hwaware artifact \(format 'onnx'"):
        read_manifest(art)


def test_refuses_newer_format_version_with_upgrade_hint(art):
    _rehash(art, lambda m: m.update(format_version=4))
    with pytest.raises(ArtifactError, match=r"manifest.json: written by a newer hwaware \(format 4\); "
                                            r"this hwaware reads format 3; upgrade hwaware"):
        verify_artifact(art)


def test_an_artifact_using_format_2_says_so_and_format_1_may_not_hold_its_fields(tmp_path):
    """tied_tensors (format 2) read by a format-1 reader looked like missing tensors ("does not
    match the model"): such an artifact is written as format 2, which that reader refuses with
    "upgrade hwaware"; one that needs nothing of format 2 stays format 1."""
    m = write_artifact(tmp_path / "a", {"tied_tensors": {"b": "a"}}, {"a": torch.zeros(2)})
    assert m["format_version"] == 2
    verify_artifact(tmp_path / "a")
    _rehash(str(tmp_path / "a"), lambda m: m.update(format_version=1))
    with pytest.raises(ArtifactError, match=r"format_version 1 with format 2's \['tied_tensors'\]"):
        verify_artifact(tmp_path / "a")


def test_an_artifact_deriving_rows_is_format_3_and_older_formats_may_not_hold_them(tmp_path):
    """derived_rows (format 3: a table's rows not stored, derived from an int8 layer's codes) read
    by a format-2 reader would look like a missing tensor: written as format 3, which that reader
    refuses with "upgrade hwaware"."""
    m = write_artifact(tmp_path / "a", {"derived_rows": {"t.weight": "h"}}, {"a": torch.zeros(2)})
    assert m["format_version"] == 3
    verify_artifact(tmp_path / "a")
    for older in (1, 2):
        _rehash(str(tmp_path / "a"), lambda m: m.update(format_version=older))
        with pytest.raises(ArtifactError, match=rf"format_version {older} with format 3's \['derived_rows'\]"):
            verify_artifact(tmp_path / "a")


@pytest.mark.parametrize("version", [0, "1", 1.0, True, None])
def test_refuses_unsupported_format_version(art, version):
    _rehash(art, lambda m: m.update(format_version=version))
    with pytest.raises(ArtifactError, match=r"manifest.json: unsupported format_version"):
        read_manifest(art)


def test_refuses_edited_manifest(art):
    mpath = art / "manifest.json"
    m = json.loads(mpath.read_text())
    m["layers"]["fc"]["scheme"] = "fp32"
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"manifest.json: manifest.json was edited after export"):
        read_manifest(art)
    del m["manifest_sha256"]
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"manifest.json was edited after export"):
        read_manifest(art)


def test_refuses_missing_truncated_and_corrupted_files(art):
    w = art / "weights.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:-10])
    with pytest.raises(ArtifactError, match=r"weights.safetensors: truncated: \d+ bytes, manifest.json records \d+"):
        read_tensors(art)
    w.write_bytes(good + b"\0")
    with pytest.raises(ArtifactError, match=r"weights.safetensors: has extra bytes"):
        read_manifest(art)
    w.write_bytes(good)
    _flip_byte(w, len(good) - 1)  # tensor data
    with pytest.raises(ArtifactError, match=r"weights.safetensors: corrupted or tampered: sha256"):
        read_tensors(art)
    w.write_bytes(good)
    program = (art / "program.pt2").read_bytes()
    _flip_byte(art / "program.pt2", 3)
    with pytest.raises(ArtifactError, match=r"program.pt2: corrupted or tampered"):
        verify_artifact(art)
    (art / "program.pt2").unlink()
    with pytest.raises(ArtifactError, match=r"program.pt2: listed in manifest.json but missing"):
        verify_artifact(art)
    (art / "program.pt2").write_bytes(program)
    verify_artifact(art)
    w.unlink()
    with pytest.raises(ArtifactError, match=r"weights.safetensors: listed in manifest.json but missing"):
        read_tensors(art)


def test_refuses_unreadable_safetensors_header_even_when_rehashed(art):
    w = art / "weights.safetensors"
    w.write_bytes((10**9).to_bytes(8, "little") + b"{not json")
    _rehash(art, lambda m: m["files"].update({"weights.safetensors": {
        "sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "bytes": w.stat().st_size}}))
    read_manifest(art)  # hashes agree: only parsing can tell
    with pytest.raises(ArtifactError, match=r"weights.safetensors: safetensors header unreadable"):
        verify_artifact(art)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: safetensors header unreadable"):
        read_tensors(art)


@pytest.mark.parametrize("name", ["../escape", "/etc/hostname", "manifest.json", "sub/x"])
def test_refuses_file_names_outside_the_artifact(art, name):
    _rehash(art, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 0}}))
    with pytest.raises(ArtifactError, match=r"manifest.json: invalid file name"):
        read_manifest(art)


def test_refuses_manifest_without_weights_entry(art):
    _rehash(art, lambda m: m["files"].pop("weights.safetensors"))
    with pytest.raises(ArtifactError, match=r"'files' does not list weights.safetensors"):
        read_manifest(art)


# ------------------------------------------------------------------------------------------------
# refusals and failures on write
# ------------------------------------------------------------------------------------------------
def test_write_refuses_to_clobber_non_artifacts(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    with pytest.raises(ArtifactError, match=r"a_file: exists and is not a directory"):
        _write(f)
    assert f.read_text() == "keep me"
    d = tmp_path / "user_dir"
    d.mkdir()
    (d / "data.csv").write_text("keep me too")
    with pytest.raises(ArtifactError, match=r"user_dir: exists, is not empty and is not an hwaware artifact"):
        _write(d)
    assert os.listdir(d) == ["data.csv"]
    e = tmp_path / "empty"
    e.mkdir()
    _write(e)
    verify_artifact(e)
    with pytest.raises(ArtifactError, match=r"empty: an artifact already exists there and overwrite=False"):
        _write(e, overwrite=False)
    assert not _tmp_dirs(tmp_path)
    # an artifact with the user's own files beside it: replacing it would delete them (it did)
    (e / "eval_results.json").write_text("keep")
    (e / "checkpoints").mkdir()
    with pytest.raises(ArtifactError, match=r"empty: holds an artifact and also 'checkpoints', 'eval_results.json', "
                                            r"which are not part of it .*replacing the artifact would delete them"):
        _write(e)
    assert sorted(os.listdir(e)) == ["checkpoints", "eval_results.json", "manifest.json", "weights.safetensors"]
    # a project directory with a manifest-like file and nothing it lists
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "manifest.json").write_text(json.dumps({"format": A.FORMAT_NAME}))
    with pytest.raises(ArtifactError, match=r"proj: holds an artifact and also 'src'"):
        _write(proj)
    assert (proj / "src").is_dir() and not _tmp_dirs(tmp_path)


def test_write_refuses_bad_inputs(tmp_path):
    with pytest.raises(ArtifactError, match=r"art: manifest is not JSON-serialisable"):
        _write(tmp_path / "art", manifest={"drop": float("nan")})
    with pytest.raises(TypeError, match=r"tensors\['x'\] must be a torch.Tensor"):
        _write(tmp_path / "art", tensors={"x": [1, 2]})
    with pytest.raises(ArtifactError, match=r"art: program_writer did not write program.pt2"):
        _write(tmp_path / "art", program_writer=lambda p: None)
    assert not (tmp_path / "art").exists() and not _tmp_dirs(tmp_path)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_overwrite_replaces_and_failure_keeps_old(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(A, "_exchange", lambda a, b: False)
    path = tmp_path / "art"
    old = _write(path, manifest={"v": "old"})

    def failing_writer(p):
        open(p, "wb").write(b"partial")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        _write(path, manifest={"v": "new"}, program_writer=failing_writer)
    assert verify_artifact(path) == old
    assert sorted(os.listdir(tmp_path)) == ["art"]

    new = _write(path, manifest={"v": "new"})
    assert verify_artifact(path) == new and new["v"] == "new"
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_fallback_publish_failure_restores_old(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "_exchange", lambda a, b: False)
    path = tmp_path / "art"
    old = _write(path, manifest={"v": "old"})
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".hwaware-tmp-") and str(dst) == str(path):
            raise OSError("disk on fire")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ArtifactError, match=r"art: moving the new artifact into place failed \(disk on fire\); nothing "
                                            r"was written at .*art and the previous artifact there is intact"):
        _write(path, manifest={"v": "new"})
    assert verify_artifact(path) == old
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_renameat2_exchange_is_used_where_available(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    if not A._exchange(str(a), str(b)):
        pytest.skip("filesystem/OS without renameat2(RENAME_EXCHANGE)")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


def test_stale_temp_dirs_are_removed(tmp_path):
    dead, fresh = tmp_path / ".hwaware-tmp-art-dead", tmp_path / ".hwaware-tmp-art-fresh"
    live, other = tmp_path / ".hwaware-tmp-art-live", tmp_path / ".hwaware-tmp-other-dead"
    for d in (dead, fresh, live, other):
        d.mkdir()
    two_hours_ago = time.time() - 7200
    for d in (dead, live, other):
        os.utime(d, (two_hours_ago, two_hours_ago))
    held = A._try_lock(str(live))  # a writer still at work, however long it has taken
    if held is None:
        pytest.skip("filesystem without flock")
    try:
        _write(tmp_path / "art")
    finally:
        os.close(held)
    # dead: unlocked and old; fresh: unlocked but may be a writer between mkdtemp and its lock
    assert not dead.exists() and fresh.exists() and live.exists() and other.exists()


def test_a_writer_whose_new_temp_dir_is_being_probed_still_writes(tmp_path, monkeypatch):
    """Another writer's stale-directory probe takes the lock for an instant: if it landed between our
    mkdtemp and our lock, our export died with BlockingIOError and left its temp directory."""
    held = []
    real = A.tempfile.mkdtemp

    def mkdtemp_then_probed(**kw):
        d = real(**kw)
        fd = A._try_lock(d)  # the prober's lock, held while our writer takes its own
        if fd is None:
            pytest.skip("filesystem without flock")
        held.append(fd)
        return d

    monkeypatch.setattr(A.tempfile, "mkdtemp", mkdtemp_then_probed)
    try:
        _write(tmp_path / "art")
    finally:
        for fd in held:
            os.close(fd)
    verify_artifact(tmp_path / "art")
    assert _tmp_dirs(tmp_path) == []


def test_without_flock_only_hour_old_temp_dirs_are_removed(tmp_path, monkeypatch):
    old, recent = tmp_path / ".hwaware-tmp-art-old", tmp_path / ".hwaware-tmp-art-recent"
    for d, age in ((old, 7200), (recent, 1800)):
        d.mkdir()
        os.utime(d, (time.time() - age, time.time() - age))
    monkeypatch.setattr(A, "_try_lock", lambda path: None)
    _write(tmp_path / "art")
    assert not old.exists() and recent.exists()


# ------------------------------------------------------------------------------------------------
# a real crash: SIGKILL an exporting process
# ------------------------------------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import importlib.util, os, sys, time, torch
    # Load the module by file: importing the hwaware package pulls in Lightning (seconds).
    spec = importlib.util.spec_from_file_location("artifact_under_test", sys.argv[1])
    A = importlib.util.module_from_spec(spec); spec.loader.exec_module(A)
    path, mode = sys.argv[2], sys.argv[3]
    hw = sys.modules["hwaware"] = type(sys)("hwaware")  # the version write_artifact records
    hw.__version__ = "0.0.test"

    def hang(msg):
        print(msg, flush=True)
        while True:
            time.sleep(60)

    def writer(p):
        with open(p, "wb") as f:
            f.write(b"half a progr")
            f.flush()
        hang("writing")

    if mode == "publish":  # die between the fallback's two renames
        A._exchange = lambda a, b: False
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if ".hwaware-old-" in dst:
                hang("moved-aside")
        os.rename = rename
        writer = None
    A.write_artifact(path, {"v": "new"}, {"w": torch.ones(3)}, program_writer=writer)
    """
)


def _kill_mid_export(tmp_path, path, mode):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), A.__file__, str(path), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line in ("writing", "moved-aside"), proc.stderr.read()
        assert _tmp_dirs(path.parent) or mode == "publish"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close(), proc.stderr.close()
    return line


def test_killed_fresh_export_leaves_nothing_at_path(tmp_path):
    path = tmp_path / "art"
    _kill_mid_export(tmp_path, path, "write")
    assert not os.path.lexists(path)
    leftovers = _tmp_dirs(tmp_path)
    assert len(leftovers) == 1 and os.path.exists(os.path.join(leftovers[0], "program.pt2"))
    with pytest.raises(ArtifactError, match=r"art: no such artifact"):
        read_manifest(path)
    _write(path)  # a later export succeeds next to the leftover, too young to be probed: kept
    verify_artifact(path)
    assert _tmp_dirs(tmp_path) == leftovers
    twenty_minutes_ago = time.time() - 1200
    os.utime(leftovers[0], (twenty_minutes_ago, twenty_minutes_ago))
    _write(path)  # the killed writer's lock died with it: its copy of the weights goes
    assert _tmp_dirs(tmp_path) == [] and os.path.isdir(path)


def test_killed_overwrite_keeps_old_artifact(tmp_path):
    path = tmp_path / "art"
    old = _write(path, manifest={"v": "old"})
    _kill_mid_export(tmp_path, path, "write")
    assert verify_artifact(path) == old
    assert torch.equal(read_tensors(path)["w_q"], _tensors()["w_q"])


def test_killed_between_fallback_renames_names_the_old_artifact(tmp_path):
    path = tmp_path / "art"
    old = _write(path, manifest={"v": "old"})
    _kill_mid_export(tmp_path, path, "publish")
    assert not os.path.lexists(path)  # "nothing there", and the error says where the old one is
    with pytest.raises(ArtifactError, match=r"art: no such artifact .*previous artifact at .*art\.hwaware-old-"):
        read_manifest(path)
    (aside,) = glob.glob(str(path) + ".hwaware-old-*")
    assert verify_artifact(aside) == old


# ------------------------------------------------------------------------------------------------
# the weights are read once, into memory: hashed and parsed from the same bytes
# ------------------------------------------------------------------------------------------------
def test_parser_matches_safetensors_on_every_dtype(tmp_path):
    from safetensors.torch import _TYPES  # every dtype safetensors writes (this torch has)
    from safetensors.torch import load as st_load

    g = torch.Generator().manual_seed(0)
    tensors = {f"t_{name}": torch.randn(3, 5, generator=g).mul(50).to(torch.int64 if name.startswith("U") else torch.float32)
               .to(dt) for name, dt in _TYPES.items() if dt is not None}
    assert A._ST_DTYPES.keys() >= {n for n, dt in _TYPES.items() if dt is not None}
    tensors["empty"], tensors["scalar"] = torch.zeros(0, 4), torch.tensor(3.5)
    path = tmp_path / "art"
    write_artifact(path, {}, tensors)
    raw = (path / "weights.safetensors").read_bytes()
    ours, theirs = read_tensors(path), st_load(raw)
    assert ours.keys() == theirs.keys() == tensors.keys()
    for k, t in ours.items():
        assert t.dtype == theirs[k].dtype and t.shape == theirs[k].shape, k
        assert torch.equal(t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8),
                           theirs[k].view(torch.uint8) if t.dim() else theirs[k].reshape(1).view(torch.uint8)), k


def _raw_artifact(path, header: dict, data: bytes):
    """An artifact whose weights file is this header and data, hashed into the manifest."""
    write_artifact(path, {}, {"a": torch.ones(1)})
    w = path / "weights.safetensors"
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    w.write_bytes(len(hb).to_bytes(8, "little") + hb + data)
    _rehash(path, lambda m: m["files"].update({"weights.safetensors": {
        "sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "bytes": w.stat().st_size}}))


def test_parser_copies_a_misaligned_tensor_and_reads_zero_size_ones_at_any_offset(tmp_path):
    data = bytes([7]) + torch.arange(4, dtype=torch.float32).numpy().tobytes()  # the float32s start at byte 1
    _raw_artifact(tmp_path / "a", {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                                   "f": {"dtype": "F32", "shape": [2, 2], "data_offsets": [1, 17]},
                                   "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [17, 17]}}, data)
    t = read_tensors(tmp_path / "a")
    assert t["b"].tolist() == [7] and t["f"].tolist() == [[0, 1], [2, 3]] and t["z"].shape == (0, 3)
    assert t["f"].data_ptr() % 4 == 0  # copied to an aligned buffer, not a misaligned view


@pytest.mark.parametrize(("raw", "why"), [
    (b"\x00" * 4, r"4 bytes, shorter than the 8-byte header length"),
    ((10**6).to_bytes(8, "little") + b"{}", r"header length 1000000 runs past the end of the file"),
    ((4).to_bytes(8, "little") + b"{no}", r"header is not JSON"),
    ((8).to_bytes(8, "little") + b"[1, 2]  ", r"header is not a JSON object"),
    ((4000).to_bytes(8, "little") + b"[" * 4000, r"header is not JSON"),  # nested past the recursion limit
])
def test_parser_refuses_a_file_that_is_no_safetensors(tmp_path, raw, why):
    path = tmp_path / "art"
    write_artifact(path, {}, {"a": torch.ones(1)})
    w = path / "weights.safetensors"
    w.write_bytes(raw)
    _rehash(path, lambda m: m["files"].update({"weights.safetensors": {
        "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}}))
    with pytest.raises(ArtifactError, match=r"weights.safetensors: safetensors header unreadable \(" + why):
        read_tensors(path)


@pytest.mark.parametrize(("header", "data", "why"), [
    ({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b"", r"'a' has shape \[0, 1180591620717411303424\]"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8, r"'a' starts at data byte 4, expected 0 .*no gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 8, r"the tensors end at data byte 4 of 8: 4 trailing"),
    ({"a": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}, b"\x01\x00\x02", r"'a' is BOOL with a byte other than 0 or 1"),
])
def test_parser_refuses_shapes_torch_cannot_hold_and_data_the_tensors_do_not_tile(tmp_path, header, data, why):
    _raw_artifact(tmp_path / "a", header, data)
    with pytest.raises(ArtifactError, match=r"safetensors header unreadable \(.*" + why):
        read_tensors(tmp_path / "a")


@pytest.mark.parametrize(("edit", "why"), [
    (lambda h: h["a"].update(data_offsets=[0, 10**6]), r"'a' has data_offsets \[0, 1000000\]; expected \[begin, end\] within"),
    (lambda h: h["a"].update(dtype="F7"), r"'a' has dtype 'F7'; expected one of"),
    (lambda h: h["a"].update(shape=[3, 3]), r"'a': 64 bytes for shape \[3, 3\] of F32 \(36 expected\)"),
    (lambda h: h["a"].update(shape=[-4, -4]), r"'a' has shape \[-4, -4\]; expected a list of non-negative ints"),
    (lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"]), r"entry 'b' starts at data byte 0, expected 64 .*no overlap"),
    (lambda h: h.update(c=[1, 2]), r"entry 'c' is not \{dtype, shape, data_offsets\}"),
])
def test_parser_refuses_a_malformed_header_even_when_rehashed(tmp_path, edit, why):
    path = tmp_path / "art"
    write_artifact(path, {}, {"a": torch.ones(4, 4), "b": torch.ones(4, 4)})
    w = path / "weights.safetensors"
    raw = w.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    w.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    _rehash(path, lambda m: m["files"].update({"weights.safetensors": {
        "sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "bytes": w.stat().st_size}}))
    with pytest.raises(ArtifactError, match=r"weights.safetensors: safetensors header unreadable \(.*" + why):
        read_tensors(path)


def test_tensors_do_not_depend_on_the_file_after_reading(tmp_path):
    # a redeploy that rewrites or truncates weights.safetensors in place (cp, rsync --inplace) must
    # not change, or with SIGBUS kill, a model serving the tensors read before: no file mapping
    path = tmp_path / "art"
    _write(path)
    tensors = read_tensors(path)
    w = path / "weights.safetensors"
    size = w.stat().st_size
    with open(w, "r+b") as f:
        f.write(b"\xff" * size)
        f.truncate(16)
    for k, t in _tensors().items():
        assert torch.equal(tensors[k], t), k


def test_an_unlisted_program_is_refused_and_other_unlisted_files_are_not_the_artifact(tmp_path):
    path = tmp_path / "art"
    _write(path)  # no program
    size = artifact_size_bytes(path)
    (path / "notes.txt").write_text("deployed 2026-11-22")
    assert artifact_size_bytes(path) == size  # not part of the artifact
    assert A.unlisted_entries(path, read_manifest(path)) == ["notes.txt"]
    (path / "program.pt2").write_bytes(b"PK\x03\x04 someone else's program")
    with pytest.raises(ArtifactError, match=r"program.pt2: not listed in manifest.json \(this export wrote no program"):
        read_manifest(path)
    with pytest.raises(ArtifactError, match=r"program.pt2: not listed"):
        read_tensors(path)


def test_a_full_disk_names_the_file_and_keeps_the_previous_artifact(tmp_path):
    import errno

    path = tmp_path / "art"
    old = _write(path, manifest={"v": "old"})

    def full(p):
        open(p, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ArtifactError, match=r"art: writing program.pt2 failed \(No space left on device\); nothing was "
                                            r"written at .*art and the previous artifact there is intact"):
        _write(path, manifest={"v": "new"}, program_writer=full)
    assert verify_artifact(path) == old and not _tmp_dirs(tmp_path)


def test_manifest_json_a_reader_could_read_two_ways_or_not_at_all_is_refused(tmp_path):
    path = tmp_path / "art"
    _write(path)
    mpath = os.path.join(path, "manifest.json")
    text = open(mpath).read()
    # a duplicate key before the real one: Python keeps the last value (the hash still matched), jq the first
    with open(mpath, "w") as f:
        f.write(text.replace("{", '{"format_version": 99, ', 1))
    with pytest.raises(ArtifactError, match=r"manifest.json is not valid JSON \(key 'format_version' appears twice"):
        read_manifest(path)
    with open(mpath, "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    with pytest.raises(ArtifactError, match=r"manifest.json nests too deeply to be a manifest"):
        read_manifest(path)
    assert not A.is_artifact(path)


# ------------------------------------------------------------------------------------------------
# what appears at path between the last check and the move into place
# ------------------------------------------------------------------------------------------------
def _racing_publish(monkeypatch, act):
    """``act(path)`` runs right before the publish, as another process could after the last check."""
    real = A._publish

    def publish(tmp, path, *how):
        monkeypatch.setattr(A, "_publish", real)
        act(path)
        return real(tmp, path, *how)

    monkeypatch.setattr(A, "_publish", publish)


def test_an_artifact_published_meanwhile_is_kept_when_overwrite_is_false(tmp_path, monkeypatch):
    path = tmp_path / "art"
    _racing_publish(monkeypatch, lambda p: _write(p, manifest={"v": "other"}))
    with pytest.raises(ArtifactError, match=r"art: something was written there while the artifact was being written"):
        _write(path, manifest={"v": "mine"}, overwrite=False)
    assert verify_artifact(path)["v"] == "other" and not _tmp_dirs(tmp_path)


@pytest.fixture(params=[(True, "nothing"), (True, "artifact"), (False, "nothing"), (False, "artifact")],
                ids=["renameat2-nothing", "renameat2-artifact", "fallback-nothing", "fallback-artifact"])
def racing_target(request, tmp_path, monkeypatch):
    """The artifact path, with or without renameat2 and with or without an artifact there already."""
    exchange, before = request.param
    if not exchange:
        monkeypatch.setattr(A, "_exchange", lambda a, b: False)
    path = tmp_path / "art"
    if before == "artifact":
        _write(path, manifest={"v": "old"})
    return path


def test_user_files_that_appear_meanwhile_are_never_deleted(tmp_path, monkeypatch, racing_target):
    path = racing_target

    def user_data(p):
        A.shutil.rmtree(p, ignore_errors=True)
        os.makedirs(p)
        open(os.path.join(p, "precious.csv"), "w").write("data")

    _racing_publish(monkeypatch, user_data)
    with pytest.raises(ArtifactError, match=r"art: .* while the (new one|artifact) was being written.* nothing was written"):
        _write(path, manifest={"v": "new"})
    assert os.listdir(path) == ["precious.csv"] and sorted(os.listdir(tmp_path)) == ["art"]


def test_an_artifact_published_meanwhile_is_overwritten_when_overwrite_is_true(tmp_path, monkeypatch, racing_target):
    path = racing_target
    _racing_publish(monkeypatch, lambda p: (A.shutil.rmtree(p, ignore_errors=True), _write(p, manifest={"v": "other"})))
    assert _write(path, manifest={"v": "mine"})["v"] == "mine"
    assert verify_artifact(path)["v"] == "mine" and sorted(os.listdir(tmp_path)) == ["art"]


def test_an_artifact_emptied_meanwhile_is_replaced(tmp_path, monkeypatch):
    path = tmp_path / "art"
    _write(path, manifest={"v": "old"})
    _racing_publish(monkeypatch, lambda p: (A.shutil.rmtree(p), os.makedirs(p)))  # an empty directory: replaceable
    assert _write(path, manifest={"v": "mine"})["v"] == "mine" and sorted(os.listdir(tmp_path)) == ["art"]


def test_a_name_as_long_as_the_filesystem_allows_is_written_overwritten_and_cleaned_up(tmp_path, monkeypatch):
    path = tmp_path / ("x" * 250)  # NAME_MAX 255: '.hwaware-tmp-' + name + a suffix would not fit
    _write(path, manifest={"v": "old"})
    assert _write(path, manifest={"v": "new"})["v"] == "new"
    monkeypatch.setattr(A, "_exchange", lambda a, b: False)  # the moved-aside name is shortened too
    assert _write(path, manifest={"v": "newer"})["v"] == "newer"
    assert os.listdir(tmp_path) == [path.name]
    stale = tmp_path / f".hwaware-tmp-{A._short_name(str(path))}-deadbeef"  # a dead writer's, found by the short name
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    _write(path, manifest={"v": "newest"})
    assert os.listdir(tmp_path) == [path.name]


def test_a_listed_file_that_cannot_be_read_is_an_artifact_error(tmp_path, monkeypatch):
    path = tmp_path / "art"
    _write(path)
    real_open = open

    def no_weights(p, *a, **k):
        if str(p).endswith("weights.safetensors"):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr("builtins.open", no_weights)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: cannot be read \(Permission denied\)"):
        read_manifest(path)
    monkeypatch.setattr("builtins.open", real_open)
    real_os_open = os.open

    def no_weights_fd(p, *a, **k):
        if str(p).endswith("weights.safetensors"):
            raise PermissionError(13, "Permission denied", str(p))
        return real_os_open(p, *a, **k)

    monkeypatch.setattr(os, "open", no_weights_fd)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: cannot be read \(Permission denied\)"):
        read_tensors(path)
