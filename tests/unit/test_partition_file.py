"""Partitions as files: every run saves one; a config can load one; a misfit is one clear line."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from fmlray.cli import main

SERIAL = ["--set", "engine.kind=serial", "--set", "run.rounds=2", "--set", "training.epochs=1"]


def test_a_saved_partition_reproduces_the_run(tmp_path, capsys):
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.name=a"]) == 0
    saved = tmp_path / "a" / "partition.npz"
    with np.load(saved) as z:  # 20 clients' train and test rows, and the data they index
        assert len(z.files) == 41 and z["train_0"].dtype == np.int64 and z["data"].dtype.kind == "U"
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.name=b",
                 "--set", "data.partition=file", "--set", f"data.partition_file={str(saved)!r}"]) == 0
    acc = lambda d: [r["accuracy"] for r in pq.read_table(tmp_path / d / "metrics.parquet").to_pylist()]  # noqa: E731
    np.testing.assert_array_equal(acc("a"), acc("b"))


@pytest.mark.parametrize("other", [["--set", "run.seed=1"],  # digits' train/test split is drawn from the seed
                                   ["--set", "data.max_train_samples=0"]])
def test_a_saved_partition_is_refused_on_other_rows_than_it_indexes(tmp_path, capsys, other):
    quick = [*SERIAL, "--set", "clients.num_clients=4", "--set", f"run.output_dir={tmp_path}"]
    assert main(["run", *quick, "--set", "run.name=a", "--set", "data.max_train_samples=400"]) == 0
    saved = tmp_path / "a" / "partition.npz"
    capsys.readouterr()
    assert main(["run", *quick, "--set", "run.name=b", "--set", "data.max_train_samples=400", *other,
                 "--set", "data.partition=file", "--set", f"data.partition_file={str(saved)!r}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"data.partition_file {saved} holds row indices of other digits data than this config loads" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "b").exists()


def write(tmp_path, **arrays):
    path = tmp_path / "p.npz"
    np.savez(path, **arrays)
    return path


def good(n=20):
    return {**{f"train_{c}": np.arange(c * 10, c * 10 + 10) for c in range(n)},
            **{f"test_{c}": np.array([c]) for c in range(n)}}


def assert_refused(tmp_path, capsys, path, fragment):
    """`fmlray run` with this partition file: one line naming the problem, exit 2, nothing written."""
    out = tmp_path / "runs"
    code = main(["run", *SERIAL, "--set", f"run.output_dir={out}", "--set", "data.partition=file",
                 "--set", f"data.partition_file={str(path)!r}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize("change, fragment", [
    (lambda a: a.update(train_3=np.array([99999])), "train_3 has indices outside"),
    (lambda a: a.update(train_4=np.arange(0, 10)), "some train rows are given to two clients"),
    (lambda a: a.update(test_5=np.array([0])), "some test rows are given to two clients"),
    (lambda a: a.pop("test_19"), "missing ['test_19']"),
    (lambda a: a.update(train_2=np.array([[1, 2]])), "train_2 must be a non-empty 1-D integer array"),
    (lambda a: a.update(train_7=np.array([500, 501, 502])),  # it used to be taken whatever data.min_samples said
     "gives client 7 only 3 training samples (< data.min_samples = 10); lower data.min_samples"),
])
def test_a_file_that_does_not_fit_is_one_line_and_exit_2(tmp_path, capsys, change, fragment):
    arrays = good()
    change(arrays)
    path = write(tmp_path, **arrays)
    assert_refused(tmp_path, capsys, path, fragment)


def test_a_floor_no_split_of_the_rows_can_meet_offers_only_the_floor_with_a_file(tmp_path, capsys):
    # 20 clients x 80 rows > digits' 1,438: fewer clients or another test_fraction would make the file refused
    out = tmp_path / "runs"
    assert main(["run", *SERIAL, "--set", f"run.output_dir={out}", "--set", "data.partition=file", "--set",
                 f"data.partition_file={str(write(tmp_path, **good()))!r}", "--set", "data.min_samples=80"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("; lower data.min_samples (the partition file fixes the clients and their rows)"), err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_missing_or_unreadable_file(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"nope")
    for path, fragment in ((tmp_path / "none.npz", "does not exist"), (tmp_path / "bad.npz", "is not an .npz (a zip of .npy arrays; this one starts with b'nope'")):
        assert main(["run", *SERIAL, "--set", "data.partition=file", "--set", f"data.partition_file={str(path)!r}"]) == 2
        assert fragment in capsys.readouterr().err
    assert main(["run", *SERIAL, "--set", "data.partition=file"]) == 2
    assert "goes with data.partition_file" in capsys.readouterr().err


def zip_of(path, members):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def altered(path, offset, change):
    """A good partition file with one byte of its zip's first central-directory entry changed (8: the flags,
    whose bit 0 says encrypted; 10: the compression method)."""
    np.savez(path, **good())
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02") + offset
    data[at] = change(data[at])
    path.write_bytes(bytes(data))
    return path


def claiming(path, member, shape):
    """A partition file whose `member`'s .npy header claims `shape`, its data the true one's."""
    members = {}
    for name, a in good().items():
        header = f"{{'descr': '<i8', 'fortran_order': False, 'shape': {shape if name == member else a.shape}, }}"
        header = header.ljust(117) + "\n"  # 10 bytes before it: a multiple of 64 in all
        members[f"{name}.npy"] = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + \
            a.astype("<i8").tobytes()
    return zip_of(path, members)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: zip_of(p, {"notes.txt": "hello"}), "is a zip but not an .npz of arrays (member 'notes.txt' is no .npy)"),
    (lambda p: zip_of(p, {f"{s}_{c}": b"\x00" * 8 for s in ("train", "test") for c in range(20)}),
     "is a zip but not an .npz of arrays (member 'test_0' is no .npy)"),
    (lambda p: np.save(p.with_suffix(".npy"), np.arange(3)) or p.with_suffix(".npy"), "a single .npy array"),
    (lambda p: np.savez(p, **{**good(), "train_0": np.array([1, 2], dtype=object)}) or p, "is not a readable .npz"),
    (lambda p: np.savez(p, **{**good(), "train_0": np.array([1.0, 2.0])}) or p, "train_0 must be a non-empty 1-D integer"),
    (lambda p: np.savez(p, **{**good(), "test_7": np.array([True])}) or p, "test_7 must be a non-empty 1-D integer"),
    (lambda p: np.savez(p, **{**good(), "train_9": np.array([], dtype=np.int64)}) or p, "train_9 must be a non-empty"),
    (lambda p: np.savez(p, **{**good(), "train_1": np.array(5)}) or p, "train_1 must be a non-empty 1-D integer"),
    (lambda p: np.savez(p, **{**good(), "extra": np.arange(2)}) or p, "unexpected ['extra']"),
    (lambda p: p.parent, "is not a readable .npz (IsADirectoryError"),
    (lambda p: (p.write_text("client,class_0\n0,5\n"), p)[1], "is not an .npz (a zip of .npy arrays; this one starts "
     "with b'client': a CSV or text file?)"),  # numpy's message was about loading pickles unsafely
    (lambda p: (p.write_bytes(b"PK"), p)[1], "is a damaged or cut-short zip, not a readable .npz"),  # as above
    (lambda p: (os.mkfifo(p), p)[1], "is a special file (a FIFO or a device), not an .npz"),  # reading it hung
    (lambda p: altered(p, 8, lambda b: b | 1), "is not a readable .npz (RuntimeError: File 'train_0.npy' is encrypted"),
    (lambda p: altered(p, 10, lambda b: 99), "is not a readable .npz (NotImplementedError: That compression method"),
    (lambda p: claiming(p, "train_0", (4 * 10**12,)), "is not a readable .npz ("),  # MemoryError; a ValueError where it is allocated
])
def test_a_file_of_another_format_is_one_line_and_exit_2(tmp_path, capsys, make, fragment):
    path = make(tmp_path / "p.npz")
    assert_refused(tmp_path, capsys, path, fragment)
