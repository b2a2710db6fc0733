"""Files someone else prepared: reads only of regular files under a size cap, writes never through a link."""

import os
import threading

import pytest

from sglr_zoo.errors import UserError
from sglr_zoo.files import WriteFailed, read_regular, refuse_link, write_atomic
from sglr_zoo.rundir import RunDir, RunLock


def test_read_regular_reads_a_plain_file(tmp_path):
    (tmp_path / "a.json").write_bytes(b"{}")
    assert read_regular(tmp_path / "a.json", 2) == b"{}"


def test_read_regular_refuses_a_fifo_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match=r"fifo: not a regular file \(a FIFO\)"):
        read_regular(tmp_path / "fifo", 100, "checkpoint file")


@pytest.mark.parametrize("path, message", [("/dev/zero", "a character device"), ("dir", "a folder")])
def test_read_regular_refuses_devices_and_folders(tmp_path, path, message):
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match=message):
        read_regular(tmp_path / path if path == "dir" else path, 100)


def test_read_regular_refuses_a_file_over_its_cap_before_reading_it(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as file:
        file.truncate(12 << 30)  # 12 GiB, no blocks
    with pytest.raises(UserError, match=r"sparse: 12,884,901,888 bytes, more than a state file can be \(100\)"):
        read_regular(sparse, 100, "state file")


def test_read_regular_keeps_absence_apart(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 100)


def test_write_atomic_never_writes_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    target = tmp_path / "run" / "metrics.csv"
    target.parent.mkdir()
    (target.parent / ".metrics.csv.partial").symlink_to(victim)  # the name older versions used
    target.symlink_to(victim)
    write_atomic(target, b"epoch\n")
    assert victim.read_text() == "mine"
    assert not target.is_symlink() and target.read_bytes() == b"epoch\n"


def test_write_atomic_concurrent_writers_each_leave_a_whole_file(tmp_path):
    path, errors = tmp_path / "results.json", []

    def write(value: bytes) -> None:
        try:
            for _ in range(50):
                write_atomic(path, value)
        except WriteFailed as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(bytes([65 + i]) * 1000,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(path.read_bytes())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_run_lock_refuses_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.lock.symlink_to(victim)
    with pytest.raises(WriteFailed, match="symbolic link"):
        RunLock.acquire(run)
    assert victim.read_text() == "precious"


def test_run_lock_refuses_a_fifo(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    os.mkfifo(run.lock)
    with pytest.raises(UserError, match="not a plain file"):
        RunLock.acquire(run)


def test_refuse_link(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "best").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="best is a symbolic link"):
        refuse_link(tmp_path / "best")
    refuse_link(tmp_path / "elsewhere")
