"""Run lifecycle pieces, in-process: the run lock (one run per output directory, never written through a link,
a filesystem without file locks warned about instead of a traceback), the tracker's metrics file on a full disk,
and the second stop signal."""

import errno
import fcntl

import pytest

from vitbench import lifecycle


def test_a_second_lock_on_the_same_directory_names_the_holder(tmp_path):
    first = lifecycle.RunLock(tmp_path / "run")
    with pytest.raises(lifecycle.LockError, match=r"is in use by a running training \(pid \d+ on "):
        lifecycle.RunLock(tmp_path / "run")
    first.file.close()  # the lock dies with its holder
    lifecycle.RunLock(tmp_path / "run")


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("user data\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(target)
    with pytest.raises(lifecycle.LockError, match="is a symbolic link"):
        lifecycle.RunLock(tmp_path / "run")
    assert target.read_text() == "user data\n"


def test_a_filesystem_without_flock_runs_unguarded_with_a_warning(tmp_path, monkeypatch, capsys):
    """Lustre mounted without `-o flock` answers flock with ENOSYS; no such filesystem can be mounted here, so
    flock itself answers as it does there."""
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = lifecycle.RunLock(tmp_path / "run")
    assert "cannot lock files (Function not implemented)" in capsys.readouterr().err
    assert "pid" in lock.path.read_text()


def test_a_full_disk_stops_the_metrics_rows_with_a_warning_never_the_run(small_fs):
    from vitbench.tracking import METRICS_FILE, Tracker, TrackingSpec

    run_dir = small_fs(64 << 10)
    tracker = Tracker(TrackingSpec("off", "p", None, None), enabled=True, run_dir=run_dir, name="n", config={})
    (run_dir / "filler").write_bytes(b"x" * ((64 << 10) - 4096))  # what is left: less than the rows below
    with pytest.warns(UserWarning, match=f"{METRICS_FILE}: No space left on device; .* training goes on"):
        for step in range(200):
            tracker.log_step(step, {"loss": 1.0, "note": "x" * 100})
    written = (run_dir / METRICS_FILE).read_bytes()
    tracker.log_eval(1, 200, {"acc1": 50.0})  # after the warning: nothing raised, nothing written
    tracker.finish({}, ([], []))
    assert (run_dir / METRICS_FILE).read_bytes() == written


