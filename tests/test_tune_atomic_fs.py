"""The storage filesystem Tune saves through: a file being written never replaces the complete one before it."""

from __future__ import annotations

import pickle

import pyarrow.fs as pafs

from aae_ray.tuning.atomic_fs import atomic_local_filesystem


def test_a_file_being_written_leaves_the_previous_version_readable(tmp_path):
    fs = atomic_local_filesystem()
    path = str(tmp_path / "experiment_state.json")
    with fs.open_output_stream(path) as out:
        out.write(b'{"trials": 1}')
    stream = fs.open_output_stream(path)
    stream.write(b'{"tri')  # a kill -9 here: the new version is never closed
    assert (tmp_path / "experiment_state.json").read_bytes() == b'{"trials": 1}'
    stream.close()
    assert (tmp_path / "experiment_state.json").read_bytes() == b'{"tri'
    assert [p.name for p in tmp_path.iterdir()] == ["experiment_state.json"]  # no temporary file left behind


def test_copy_files_into_it_works_like_the_local_filesystem(tmp_path):
    src, dest = tmp_path / "staging", tmp_path / "storage"
    (src / "trial_1").mkdir(parents=True)
    (src / "trial_1" / "result.json").write_text('{"epoch": 1}\n')
    (src / "searcher-state.pkl").write_bytes(b"\x80\x04N.")
    pafs.copy_files(str(src), str(dest), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=atomic_local_filesystem())
    assert (dest / "trial_1" / "result.json").read_text() == '{"epoch": 1}\n'
    assert (dest / "searcher-state.pkl").read_bytes() == b"\x80\x04N."


def test_it_survives_pickling_for_trial_workers(tmp_path):
    fs = pickle.loads(pickle.dumps(atomic_local_filesystem()))
    with fs.open_output_stream(str(tmp_path / "x")) as out:
        out.write(b"ok")
    assert (tmp_path / "x").read_bytes() == b"ok"
    assert fs.equals(atomic_local_filesystem())
