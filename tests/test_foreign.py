"""Foreign files: what a framework puts into a checkpoint's directory (Lightning's ``meta.pt``)
is no damage, and save, load, verify and removal leave it alone, in both layouts."""

import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

import zdcp
from zdcp.storage.contents import pending_directories


def _foreign(directory):
    """Put a framework's kind of files into ``directory``: a file, a directory of files, a link."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.pt").write_bytes(b"lightning metadata")
    (directory / "logs").mkdir()
    (directory / "logs" / "run.txt").write_text("step 1")
    (directory / "latest").symlink_to("meta.pt")


def _assert_foreign_kept(directory):
    assert (directory / "meta.pt").read_bytes() == b"lightning metadata"
    assert (directory / "logs" / "run.txt").read_text() == "step 1"
    assert os.readlink(directory / "latest") == "meta.pt"


def _state(value):
    return {"w": torch.full((4, 3), float(value)), "opt": {"step": value}}


def _loaded(path):
    out = {"w": torch.zeros(4, 3), "opt": {"step": 0}}
    zdcp.load(out, path)
    return out["w"][0, 0].item(), out["opt"]["step"]


def test_a_save_into_a_directory_of_foreign_files_keeps_them(ckpt, layout):
    _foreign(ckpt)
    zdcp.save(_state(1), ckpt, layout=layout)
    _assert_foreign_kept(ckpt)
    assert _loaded(ckpt) == (1.0, 1)
    zdcp.save(_state(2), ckpt, layout=layout, overwrite=True)  # replacing the checkpoint keeps them too
    _assert_foreign_kept(ckpt)
    assert _loaded(ckpt) == (2.0, 2)
    assert pending_directories(ckpt.parent) == [], "nothing left beside it"


def test_verify_lists_foreign_files_and_passes(ckpt, layout):
    zdcp.save(_state(1), ckpt, layout=layout)
    (ckpt / "meta.pt").write_bytes(b"written after the save, as Lightning does")
    (ckpt / "extra").mkdir()
    (ckpt / "extra" / "notes.txt").write_text("x")
    report = zdcp.verify(ckpt)
    assert report.ok and report.foreign == ["extra", "meta.pt"], (report.faults, report.foreign)
    assert sorted(zdcp.open(ckpt)) == ["opt", "w"]  # opened as ever: foreign files are no nodes
    run = subprocess.run([sys.executable, "-m", "zdcp", "verify", str(ckpt)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "foreign, ignored: meta.pt" in run.stdout and "foreign, ignored: extra" in run.stdout
    # a stray file inside an array's directory (the files layout) is still damage
    if layout == "files":
        (ckpt / "w" / "c.9.9").write_bytes(b"?")
        assert [str(f) for f in zdcp.verify(ckpt).faults] == [
            "w: unexpected file 'w/c.9.9' (not part of the checkpoint)"
        ]


def test_the_manager_removing_a_checkpoint_leaves_foreign_files(tmp_path, layout):
    manager = zdcp.CheckpointManager(tmp_path, max_to_keep=1, layout=layout)
    manager.save(1, _state(1))
    first = manager.checkpoint_path(1)
    (tmp_path / os.path.basename(first) / "meta.pt").write_bytes(b"lightning metadata")
    manager.save(2, _state(2))
    manager.close()
    assert manager.all_steps() == [2]
    assert sorted(os.listdir(first)) == ["meta.pt"], "the checkpoint went, its foreign file stayed"
    assert zdcp.CheckpointManager(tmp_path).all_steps() == [2]  # what is left is no step
    assert str(zdcp.latest_checkpoint(tmp_path)) == manager.checkpoint_path(2)
    assert pending_directories(tmp_path) == []
    with pytest.raises(zdcp.IncompleteCheckpointError):  # a directory of foreign files is no checkpoint
        zdcp.load(_state(0), first)


def test_a_dcp_checkpoint_is_replaced_only_with_overwrite_and_its_files_go(ckpt, layout):
    dcp.save(_state(1), checkpoint_id=ckpt)
    (ckpt / "meta.pt").write_bytes(b"lightning metadata")
    with pytest.raises(zdcp.CheckpointExistsError, match="holds a DCP checkpoint; pass overwrite=True"):
        zdcp.save(_state(2), ckpt, layout=layout)
    zdcp.save(_state(2), ckpt, layout=layout, overwrite=True)
    names = sorted(os.listdir(ckpt))
    assert ".metadata" not in names and not any(n.endswith(".distcp") for n in names), names
    assert "meta.pt" in names and zdcp.verify(ckpt).foreign == ["meta.pt"]
    assert _loaded(ckpt) == (2.0, 2)


def test_remains_of_a_checkpoint_are_no_foreign_files(ckpt, layout):
    zdcp.save(_state(1), ckpt, layout=layout)
    os.unlink(ckpt / ("zarr.json" if layout == "files" else "manifest.ocdbt"))  # un-committed by hand
    before = sorted(str(p) for p in ckpt.rglob("*"))
    with pytest.raises(zdcp.CheckpointExistsError, match="holds no zdcp checkpoint but what looks like part of one"):
        zdcp.save(_state(2), ckpt, layout=layout, overwrite=True)
    assert sorted(str(p) for p in ckpt.rglob("*")) == before


def test_foreign_files_that_cannot_be_carried_over_are_refused_before_writing(ckpt, layout):
    ckpt.mkdir()
    os.mkfifo(ckpt / "pipe")
    with pytest.raises(zdcp.StorageError, match=r"ckpt holds files that are not part of the checkpoint \(pipe\)"):
        zdcp.save(_state(1), ckpt, layout=layout)
    assert os.listdir(ckpt) == ["pipe"] and pending_directories(ckpt.parent) == []


def test_a_foreign_file_named_like_a_node_of_the_new_checkpoint_is_refused(ckpt):
    ckpt.mkdir()
    (ckpt / "w").write_text("mine")
    with pytest.raises(zdcp.CheckpointExistsError, match=r"ckpt/w is not part of the checkpoint"):
        zdcp.save(_state(1), ckpt, layout="files")
    assert os.listdir(ckpt) == ["w"] and pending_directories(ckpt.parent) == []


KILL_POINTS = {  # where: the function patched to SIGKILL the process
    "save: linked, not swapped": "zdcp.storage.saving:exchange",
    "save: swapped, the old one not deleted": "zdcp.storage.saving:_delete_replaced",
    "removal: linked, not swapped": "zdcp.storage.removal:exchange",
    "removal: swapped, the checkpoint not deleted": "zdcp.storage.removal:sync_directory",
}


def _killed_at(path, where, layout):
    import importlib

    from zdcp.storage.location import Location
    from zdcp.storage.removal import remove_committed

    module, _, name = KILL_POINTS[where].partition(":")
    setattr(importlib.import_module(module), name, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
    if where.startswith("save"):
        zdcp.save(_state(2), path, overwrite=True, layout=layout)
    else:
        remove_committed(Location(str(path)))


@pytest.mark.parametrize("where", KILL_POINTS)
def test_a_save_or_removal_killed_at_each_step_leaves_the_foreign_files_in_place(ckpt, layout, where):
    _foreign(ckpt)
    zdcp.save(_state(1), ckpt, layout=layout)
    process = mp.get_context("spawn").Process(target=_killed_at, args=(ckpt, where, layout))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL
    _assert_foreign_kept(ckpt)
    if where == "removal: swapped, the checkpoint not deleted":
        with pytest.raises(zdcp.IncompleteCheckpointError):
            _loaded(ckpt)
    else:
        assert _loaded(ckpt) == ((2.0, 2) if where.startswith("save: swapped") else (1.0, 1))
    zdcp.save(_state(3), ckpt, layout=layout, overwrite=True)  # removes what the killed process left
    _assert_foreign_kept(ckpt)
    assert _loaded(ckpt) == (3.0, 3) and zdcp.verify(ckpt).foreign == ["latest", "logs", "meta.pt"]
    if where.startswith("removal"):  # a save killed in its commit leaves its directory, as in test_reliability
        assert pending_directories(ckpt.parent) == []


def test_without_an_atomic_exchange_saves_and_removals_keep_foreign_files_too(tmp_path, layout, monkeypatch):
    import zdcp.storage.removal
    import zdcp.storage.saving

    monkeypatch.setattr(zdcp.storage.saving, "exchange", lambda a, b: False)  # NFS, macOS
    monkeypatch.setattr(zdcp.storage.removal, "exchange", lambda a, b: False)
    manager = zdcp.CheckpointManager(tmp_path, max_to_keep=1, layout=layout)
    _foreign(tmp_path / "step_1")
    manager.save(1, _state(1))
    zdcp.save(_state(5), tmp_path / "step_1", layout=layout, overwrite=True)  # over a checkpoint
    _assert_foreign_kept(tmp_path / "step_1")
    assert _loaded(tmp_path / "step_1") == (5.0, 5)
    manager.save(2, _state(2))  # removes step 1
    manager.close()
    _assert_foreign_kept(tmp_path / "step_1")
    assert sorted(os.listdir(tmp_path / "step_1")) == ["latest", "logs", "meta.pt"]
    assert pending_directories(tmp_path) == []


def test_files_named_like_dcp_files_are_foreign_where_no_dcp_checkpoint_is(ckpt, layout):
    (ckpt / ".metadata").mkdir(parents=True)  # an editor's directory, say
    (ckpt / ".metadata" / "settings").write_text("x")
    (ckpt / "notes.distcp").write_text("mine")
    zdcp.save(_state(1), ckpt, layout=layout)
    assert (ckpt / ".metadata" / "settings").read_text() == "x" and (ckpt / "notes.distcp").read_text() == "mine"
    assert zdcp.verify(ckpt).foreign == [".metadata", "notes.distcp"]


def test_foreign_directories_keep_their_mode(ckpt, layout):
    (ckpt / "private").mkdir(parents=True)
    (ckpt / "private" / "key").write_text("secret")
    os.chmod(ckpt / "private", 0o700)
    zdcp.save(_state(1), ckpt, layout=layout)
    zdcp.save(_state(2), ckpt, layout=layout, overwrite=True)
    assert (os.stat(ckpt / "private").st_mode & 0o777) == 0o700


def test_an_unreadable_root_document_is_no_checkpoint_to_replace(ckpt, layout):
    ckpt.mkdir()
    (ckpt / "zarr.json").write_text("{not json")
    (ckpt / "meta.pt").write_text("x")
    with pytest.raises(zdcp.CheckpointExistsError, match=r"what looks like part of one \(zarr.json\)"):
        zdcp.save(_state(1), ckpt, layout=layout, overwrite=True)
    assert sorted(os.listdir(ckpt)) == ["meta.pt", "zarr.json"]


def _removal_killed_between_its_renames(path):
    import zdcp.storage.removal as removal
    from zdcp.storage.location import Location

    removal.exchange = lambda a, b: False  # no atomic exchange (NFS, macOS)
    renames, rename = [], os.rename

    def rename_then_die(a, b):
        renames.append((a, b))
        if len(renames) == 2:  # the checkpoint went aside; the links are not in place yet
            os.kill(os.getpid(), signal.SIGKILL)
        rename(a, b)

    removal.os.rename = rename_then_die
    removal.remove_committed(Location(str(path)))


def test_a_removal_killed_between_its_two_renames_loses_no_foreign_file(ckpt, layout):
    _foreign(ckpt)
    zdcp.save(_state(1), ckpt, layout=layout)
    process = mp.get_context("spawn").Process(target=_removal_killed_between_its_renames, args=(ckpt,))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL and not ckpt.exists()
    assert zdcp.latest_checkpoint(ckpt.parent) is None  # its clean-up puts the links in place
    _assert_foreign_kept(ckpt)
    assert sorted(os.listdir(ckpt)) == ["latest", "logs", "meta.pt"] and pending_directories(ckpt.parent) == []
