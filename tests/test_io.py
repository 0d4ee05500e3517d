"""l2fast._io: atomic writes never replace a symlink, a device, a FIFO or a folder; run folders."""
import os
import stat
import threading

import pytest
import torch

from l2fast._io import atomic_path, atomic_write_text, create_run_folder, create_unique_folder
from l2fast.errors import OutputError


def kind(path):
    return stat.S_IFMT(os.lstat(path).st_mode)


def test_regular_file_is_replaced_atomically_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "m.jsonl"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n" and kind(target) == stat.S_IFREG
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~_umask()
    assert [p.name for p in target.parent.iterdir()] == ["m.jsonl"]  # no temporary left behind


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert kind(link) == stat.S_IFLNK and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "made-by-the-write")
    atomic_write_text(dangling, "x")
    assert kind(dangling) == stat.S_IFLNK and (tmp_path / "made-by-the-write").read_text() == "x"


def test_atomic_path_follows_a_symlink_too(tmp_path):
    real = tmp_path / "model.pt"
    real.write_bytes(b"old")
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    with atomic_path(link) as tmp:
        torch.save({"x": torch.ones(2)}, tmp)
    assert kind(link) == stat.S_IFLNK
    assert torch.equal(torch.load(real, weights_only=True)["x"], torch.ones(2))


def test_fifo_is_streamed_to_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that the write is not refused
    try:
        atomic_write_text(fifo, "hello\n")
        assert os.read(fd, 100) == b"hello\n"
    finally:
        os.close(fd)
    assert kind(fifo) == stat.S_IFIFO


def test_fifo_without_reader_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = []
    writer = threading.Thread(target=lambda: result.append(_raises(lambda: atomic_write_text(fifo, "x"))),
                              daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert result and isinstance(result[0], OutputError) and "no reader" in str(result[0])
    assert kind(fifo) == stat.S_IFIFO


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


@pytest.mark.skipif(not hasattr(os, "mknod") or os.geteuid() != 0, reason="making a device node needs root")
def test_character_device_is_written_not_replaced(tmp_path):
    # a node of our own for /dev/null's device (1, 3): the system's /dev/null is never touched
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    atomic_write_text(null, "discarded")
    with atomic_path(null) as tmp:
        torch.save({"x": 1}, tmp)
    assert kind(null) == stat.S_IFCHR and os.stat(null).st_rdev == os.makedev(1, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["null"]


def test_folder_target_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("mine")
    with pytest.raises(OutputError, match="is a folder"):
        atomic_write_text(tmp_path / "d", "x")
    with pytest.raises(OutputError, match="is a folder"):
        with atomic_path(tmp_path / "d"):
            pass
    assert (tmp_path / "d" / "keep").read_text() == "mine"


def test_run_folder_rules(tmp_path):
    assert create_run_folder(tmp_path / "a" / "b").is_dir()  # new, parents made
    assert create_run_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"  # empty: fine
    (tmp_path / "a" / "b" / "x").write_text("mine")
    with pytest.raises(OutputError, match="non-empty"):
        create_run_folder(tmp_path / "a" / "b")
    assert create_run_folder(tmp_path / "a" / "b", overwrite=True).is_dir()
    with pytest.raises(OutputError, match="not a folder"):
        create_run_folder(tmp_path / "a" / "b" / "x")
    with pytest.raises(OutputError, match="parent of it is a file"):
        create_run_folder(tmp_path / "a" / "b" / "x" / "y")
    assert (tmp_path / "a" / "b" / "x").read_text() == "mine"


def test_unique_folders_are_distinct_under_contention(tmp_path):
    made = []
    threads = [threading.Thread(target=lambda: made.append(create_unique_folder(tmp_path, "stamp")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(made) == 8 and len(set(made)) == 8
    assert sorted(p.name for p in made) == sorted(["stamp"] + [f"stamp-{n}" for n in range(2, 9)])


# ----------------------------------------------------------------------------- issue 18: writes that fail

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_write_that_fails_is_an_output_error_naming_the_path(tmp_path):
    """A full device was a bare `No space left on device`, without the path."""
    with pytest.raises(OutputError, match=r"^/dev/full: cannot write it \(No space left on device\)$"):
        atomic_write_text("/dev/full", "x" * 10000)
    os.symlink("/dev/full", tmp_path / "link")
    with pytest.raises(OutputError, match=rf"^{tmp_path / 'link'}: cannot write it \(No space left"):
        with atomic_path(tmp_path / "link") as tmp:
            tmp.write_bytes(b"x" * 10000)


def test_a_full_disk_leaves_no_temporary_file_and_the_record_is_rewritten_in_place(tmp_path, monkeypatch):
    from l2fast import runs

    (tmp_path / "summary.json").write_text('{"status": "running"}\n' + " " * 200)
    real_write_bytes = type(tmp_path).write_bytes

    def full_disk(self, data):  # a new file gets no space: the first block cannot be written
        real_write_bytes(self, b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_bytes", full_disk)
    with pytest.raises(OutputError, match="notes.txt: cannot write it"):
        atomic_write_text(tmp_path / "notes.txt", "new")
    runs.write_summary(tmp_path, {"status": "failed", "reason": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left
    assert runs.json.loads((tmp_path / "summary.json").read_text()) == {"status": "failed", "reason": "x"}
    with pytest.raises(OutputError, match="summary.json: cannot write it"):
        runs.write_summary(tmp_path / "gone", {"status": "failed"})  # nothing to rewrite in place: refused
