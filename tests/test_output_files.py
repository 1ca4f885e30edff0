"""The files of ``ipfx compare`` and ``ipfx demo`` against a hostile user (a third review): a claim left half
done, reports killed while written, checkpoints and store lines that are not what ipfx wrote, state dicts of
every layout for ``ipfx inspect``, a folder that refuses writes, two writers racing for one folder. Each is
handled (a warning and a fresh start, a clear one-line error), never a traceback or a lost file."""

import os
import warnings

import pytest
import torch

from ipfx.atomic import HOST, write_atomically
from ipfx.errors import IPFXValueError
from ipfx.experiments import checkpoint as ckpt
from ipfx.experiments.outputs import MARKER, claim, owner_of, write_text
from helpers import store_record
from ipfx.experiments.store import ResultStore
from test_checkpoints import subprocess_pid


@pytest.mark.parametrize("writer", ["killed", "alive"])
def test_a_folder_whose_only_file_is_a_claims_temporary_is_unclaimed(tmp_path, writer):
    """write_atomically names the marker's temporary ``..ipfx-output.json.<host>.<pid>.<thread>.tmp`` (a dot
    before the marker's own): a claim in progress (two sweeps started on one new folder) or killed there is
    not "files ipfx did not write" (it was, for both: the second sweep refused, and a killed claim locked the
    folder for good); the claim then goes ahead and a dead writer's temporary is deleted."""
    folder = tmp_path / "out"
    folder.mkdir()
    pid = subprocess_pid() if writer == "killed" else os.getpid()
    temporary = folder / f".{MARKER}.{HOST}.{pid}.1.tmp"
    temporary.write_bytes(b'{"comm')
    assert owner_of(folder) is None
    claim(folder, "compare")
    assert owner_of(folder) == "compare"
    assert temporary.exists() == (writer == "alive")


def test_reports_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """results.md and accuracy.png: a write that fails (a kill, a full disk) leaves the previous file (it left
    an empty one: Path.write_text and savefig truncate in place)."""
    import matplotlib.figure

    from ipfx.experiments import report

    table, plot_path = tmp_path / "results.md", tmp_path / "accuracy.png"
    write_text(table, "old table\n")
    records = [store_record(space=s) for s in ("sp", "ip")]
    report.plot(records, plot_path)
    before = plot_path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def fail(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    with pytest.raises(OSError):
        report.plot(records, plot_path)
    assert plot_path.read_bytes() == before

    def fail_write(path, write):
        return write_atomically(path, lambda f: (f.write(b"new ta"), (_ for _ in ()).throw(OSError(28, "full"))))

    monkeypatch.setattr("ipfx.experiments.outputs.write_atomically", fail_write)
    with pytest.raises(OSError):
        write_text(table, "new table\n")
    assert table.read_text() == "old table\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("state", [[1, 2], torch.zeros(3), {"format": None, "key": 5}, {"key": "abc"}],
                         ids=["a list", "a tensor", "a key that is a number", "no format"])
def test_a_checkpoint_that_is_not_a_run_state_starts_the_run_over(tmp_path, state):
    """A file that loads with weights_only but is not a dict of this layout (it raised AttributeError or
    TypeError on every rerun)."""
    path = tmp_path / "run.pt"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="belongs to another run or version; the run starts over"):
        assert ckpt.load(path, ("cnn", 1)) is None


def test_an_unreadable_checkpoint_is_reported_in_one_line(tmp_path):
    """torch's refusal of a pickle that weights_only does not take spans lines and advises weights_only=False (poor
    advice for a hostile file): the warning keeps its first line."""
    import datetime

    path = tmp_path / "run.pt"
    torch.save({"when": datetime.date(2026, 1, 1)}, path)  # (an object weights_only refuses)
    with pytest.warns(UserWarning) as caught:
        assert ckpt.load(path, ("cnn", 1)) is None
    message = str(caught[0].message)
    assert "the run starts over" in message and "\n" not in message and "weights_only=False" not in message


def test_a_checkpoint_the_folder_refuses_is_a_clear_error(tmp_path):
    """A checkpoint write the file system refuses (read-only, full; here the folder is a file) raises
    IPFXValueError saying what to do (it was a raw traceback)."""
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(IPFXValueError, match="cannot write the checkpoint .* rerun the same command to resume"):
        ckpt.save(tmp_path / "checkpoints" / "run.pt", {"key": ["cnn"]})


def test_a_write_whose_folder_is_removed_midway_makes_it_again(tmp_path, monkeypatch):
    """Another process removes the checkpoint folder once it is empty (ckpt.remove), which can fall between a
    writer's mkdir and its open: the write makes the folder again (it raised FileNotFoundError)."""
    import ipfx.atomic as atomic

    path = tmp_path / "checkpoints" / "run.pt"
    real = atomic.remove_stale_temporaries
    calls = []

    def and_remove_the_folder(p):
        real(p)
        calls.append(p)
        if len(calls) == 1:
            p.parent.rmdir()  # (what a finished run's ckpt.remove does to an empty folder)

    monkeypatch.setattr(atomic, "remove_stale_temporaries", and_remove_the_folder)
    write_atomically(path, lambda f: f.write(b"state"))
    assert path.read_bytes() == b"state" and len(calls) == 2


def test_store_lines_python_cannot_convert_or_that_name_no_space_are_skipped(tmp_path):
    """Lines that are not records are warned about and skipped (an integer of more digits than Python
    converts, JSON nested deeper than the recursion limit: ValueError and RecursionError the store did not
    catch; a space other than sp and ip, which the report's tables index by)."""
    import json

    good = store_record()
    path = tmp_path / "results.jsonl"
    lines = [json.dumps(good), '{"accuracy": ' + "9" * 5000 + "}", "[" * 100000 + "]" * 100000,
             json.dumps({**good, "space": "dense", "seed": 1})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="3 line\\(s\\) are not records"):
        records = ResultStore(path).records()
    assert records == [good]


@pytest.mark.parametrize("layout", ["coo", "csr", "quantized", "meta"])
def test_inspect_describes_state_dicts_of_every_layout(tmp_path, layout, capsys):
    """Sparse, quantized and meta tensors load with weights_only; ipfx inspect lists them (it raised
    NotImplementedError on count_nonzero, or on .item() of a meta tensor)."""
    from ipfx.cli.main import main

    dense = torch.tensor([[0.0, 1.5], [0.0, -2.0]])
    tensor = {"coo": dense.to_sparse(), "csr": dense.to_sparse_csr(),
              "quantized": torch.quantize_per_tensor(dense, 0.5, 0, torch.qint8),
              "meta": torch.empty(2, 2, device="meta")}[layout]
    path = tmp_path / "state.pt"
    torch.save({"layer.weight": tensor, "layer.mask": torch.tensor([1.0, 0.0])}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("layer.weight"))
    assert row.split()[-2] == ("?" if layout == "meta" else "2")


def test_a_claim_that_lands_while_the_folder_is_looked_at_is_seen(tmp_path, monkeypatch):
    """Two sweeps started on one new folder: the other's marker renamed into place between this one's look for
    a marker and its listing of the folder made the folder "files ipfx did not write" (2 of 300 simultaneous
    claims); the owner is looked for again before the folder is called unknown."""
    from ipfx.experiments import outputs

    folder = tmp_path / "out"
    folder.mkdir()
    looks = []
    real = outputs._owner_by_files

    def marker_lands_after_the_first_look(f):
        looks.append(f)
        if len(looks) == 1:
            write_atomically(f / MARKER, lambda out: out.write(b'{"command": "compare"}\n'))  # (the other sweep)
            return None
        return real(f)

    monkeypatch.setattr(outputs, "_owner_by_files", marker_lands_after_the_first_look)
    assert owner_of(folder) == "compare" and len(looks) == 2
    claim(folder, "compare")


def test_stale_temporaries_of_a_folder_another_process_removed_are_nothing_to_remove(tmp_path, monkeypatch):
    """The folder removed between a look at it and its listing (two sweeps saving and removing checkpoints in one
    folder: FileNotFoundError from the listing, 1 save in ~6000 of a tight loop)."""
    import pathlib

    from ipfx.atomic import remove_stale_temporaries

    monkeypatch.setattr(pathlib.Path, "is_dir", lambda self: True)  # (it was there when looked at)
    remove_stale_temporaries(tmp_path / "gone" / "run.pt")
