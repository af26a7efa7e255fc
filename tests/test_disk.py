"""A full, read-only or refusing disk: one `edgetune:` line, no temporary files, last checkpoint intact.

Where the platform lets the test mount a tmpfs (root on Linux), the disk is really full; an
injected ENOSPC covers the write that the free-space check cannot foresee.
"""

import errno
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgetune import folders
from edgetune.errors import EdgetuneError
from edgetune.train import checkpoint, statefile
from edgetune.train.command import train
from edgetune.train.config import TrainConfig


def config(tiny_model, data, out, **overrides) -> TrainConfig:
    settings = dict(model=str(tiny_model), data=str(data), output=str(out), dtype="fp32", steps=6,
                    batch_size=4, seq_len=64, lr=1e-2, rank=8, eval_every=0, save_every=2,
                    progress=False, seed=0, threads=1)
    return TrainConfig(**{**settings, **overrides})


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` until `leave` bytes are free; returns the filler file."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, folders.free_bytes(disk) - leave))
    return filler


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if folders.LEFTOVER.search(p.name)]


def test_a_full_disk_stops_training_with_one_line_and_the_last_checkpoint_whole(
        tiny_model, alpaca_file, tmp_path):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        run = disk / "run"
        # room for one checkpoint (about 240 KiB here) and the 1 MiB of slack the check keeps
        filler = fill(disk, 2**20 + 350 * 1024)
        with pytest.raises(EdgetuneError) as failure:
            train(config(tiny_model, alpaca_file, run, steps=6, save_every=1))
        message = str(failure.value)
        assert message.startswith(f"not enough space in {run / 'checkpoints'} for the step-")
        assert "it needs" in message and "is free" in message
        assert hidden(run) == [] and [p.name for p in checkpoint.completed(run)] == ["step-000001"]
        filler.unlink()
        summary = train(TrainConfig(output=str(run), resume=True, progress=False))
        assert summary.steps == 6


def test_a_write_that_runs_out_of_space_is_removed(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """The free-space check passed, then the disk filled up (another program wrote meanwhile)."""
    run = tmp_path / "run"
    original, calls = statefile.save, []

    def full_disk(folder, state):
        calls.append(folder)
        original(folder, state)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(statefile, "save", full_disk)
    with pytest.raises(EdgetuneError, match=rf"cannot write in {run / 'checkpoints'}: no space left, "
                                            r".* free; this write needs .* MiB"):
        train(config(tiny_model, alpaca_file, run, steps=4))
    assert [p.name for p in checkpoint.completed(run)] == ["step-000002"]
    assert hidden(run) == [] and not (run / "adapter_model.safetensors").exists()


def test_safetensors_own_error_for_a_full_disk_is_recognised():
    error = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                         'message: "No space left on device" })')
    assert folders.disk_error(error) == "no space left"
    assert folders.disk_error(ValueError("a bug")) is None


def test_a_read_only_output_is_one_line(tiny_model, alpaca_file, tmp_path):
    with tmpfs(tmp_path / "disk", "1m", read_only=True) as disk:
        with pytest.raises(EdgetuneError, match=rf"cannot write in {disk}: read-only file system"):
            train(config(tiny_model, alpaca_file, disk / "run"))


def test_a_full_disk_keeps_the_previous_export(tiny_model, tmp_path):
    from edgetune.export.command import main
    from edgetune.export.config import ExportConfig

    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "export"
        main(ExportConfig(run=str(tiny_model), output=str(out), gguf="f16", verify=False))
        before = sorted(p.name for p in out.iterdir())
        dead = subprocess.Popen(["true"])
        dead.wait()
        (disk / f".export.tmp-{dead.pid}").mkdir()  # what an export killed earlier left
        fill(disk, 100 * 1024)
        with pytest.raises(EdgetuneError, match=rf"not enough space in {disk} for this export: "
                                                r"it needs .* MiB, .* is free"):
            main(ExportConfig(run=str(tiny_model), output=str(out), gguf="f16", verify=False,
                              force=True))
        assert sorted(p.name for p in out.iterdir()) == before
        assert [p.name for p in disk.iterdir() if p.name.startswith(".")] == []  # removed, too


def test_a_real_full_disk_mid_write_is_one_line(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """No free-space check: the libraries' own write errors on a full tmpfs are recognised."""
    monkeypatch.setattr(folders, "require_space", lambda *args: None)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        run = disk / "run"
        fill(disk, 100 * 1024)
        with pytest.raises(EdgetuneError, match=rf"cannot write in {run}.*: no space left"):
            train(config(tiny_model, alpaca_file, run, steps=2, save_every=1))
        assert hidden(run) == []
