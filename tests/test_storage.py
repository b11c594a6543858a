"""RunStorage on a local directory and on S3 (moto's server, started by the tests)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from rft_cluster.storage import RunStorage
from tests.conftest import RunLocation, S3Server


def test_files_round_trip_and_listing_hides_temporaries(run_location: RunLocation) -> None:
    st = RunStorage(run_location.uri)
    assert not st.exists("a/b.txt") and st.list("a") == []
    st.write_text("a/b.txt", "one")
    st.write_bytes("a/c.bin", b"\x00\x01")
    st.write_text("a/.hidden.tmp", "x")
    st.write_text("a/b.txt", "two")  # replaced, not appended
    assert st.read_text("a/b.txt") == "two" and st.read_bytes("a/c.bin") == b"\x00\x01"
    assert st.list("a") == ["b.txt", "c.bin"]
    assert run_location.files() == ["a/.hidden.tmp", "a/b.txt", "a/c.bin"]  # no leftovers of the atomic writes
    st.delete("a/b.txt")
    st.delete("a/missing")  # not an error
    assert st.list("a") == ["c.bin"]
    st.delete("a")
    assert run_location.files() == [] and not st.exists("a")


def test_pickles_as_its_uri_and_reaches_the_same_files(run_location: RunLocation) -> None:
    st = RunStorage(run_location.uri)
    st.write_text("x.txt", "hi")
    again = pickle.loads(pickle.dumps(st))
    assert again.uri == st.uri and again.read_text("x.txt") == "hi"


def test_a_relative_path_is_fixed_where_it_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    st = RunStorage("runs/x")
    monkeypatch.chdir("/")  # an actor elsewhere unpickles it
    again = pickle.loads(pickle.dumps(st))
    again.write_text("f", "1")
    assert (tmp_path / "runs" / "x" / "f").read_text() == "1"
    assert st.local_path() == tmp_path / "runs" / "x" and st.uri_for("f") == str(tmp_path / "runs" / "x" / "f")


def test_uri_for_leaves_out_the_query_options(s3_server: S3Server) -> None:
    st = RunStorage(f"s3://testing:hush@{s3_server.bucket}/r?endpoint_override=127.0.0.1:{s3_server.port}&scheme=http")
    st.write_text("f", "1")  # the credentials in the URI work
    assert st.uri_for() == f"s3://{s3_server.bucket}/r"
    assert st.uri_for("checkpoints/step-000002") == f"s3://{s3_server.bucket}/r/checkpoints/step-000002"
    assert st.local_path() is None


def test_upload_replaces_or_merges(run_location: RunLocation, tmp_path: Path) -> None:
    st = RunStorage(run_location.uri)
    a, b = tmp_path / "rank0", tmp_path / "rank1"
    (a / "tag").mkdir(parents=True)
    (b / "tag").mkdir(parents=True)
    (a / "latest").write_text("tag")
    (a / "tag" / "shard0").write_text("0")
    (b / "tag" / "shard1").write_text("1")
    st.upload_dir(a, "state", replace=False)
    st.upload_dir(b, "state", replace=False)  # the other rank's files stay
    assert run_location.files() == ["state/latest", "state/tag/shard0", "state/tag/shard1"]
    st.upload_dir(b, "state")  # replacing: only what was uploaded remains
    assert run_location.files() == ["state/tag/shard1"]
    down = st.download_dir("state", tmp_path / "down")
    assert (down / "tag" / "shard1").read_text() == "1"


def test_staged_dir_writes_in_place_locally_and_uploads_otherwise(run_location: RunLocation) -> None:
    st = RunStorage(run_location.uri)
    with st.staged_dir("model") as out:
        (out / "config.json").write_text("{}")
        assert (out == st.local_path("model")) == st.is_local
    assert run_location.files() == ["model/config.json"]
    with pytest.raises(RuntimeError), st.staged_dir("broken") as out:
        (out / "half").write_text("x")
        raise RuntimeError("the writer failed")
    if not st.is_local:  # a failed write is never uploaded, and its temporary directory is gone
        assert run_location.files() == ["model/config.json"] and not out.exists()


def test_fetched_dir_is_named_like_its_source_and_missing_is_file_not_found(run_location: RunLocation) -> None:
    st = RunStorage(run_location.uri)
    st.write_text("state/step-3/shard", "s")
    with st.fetched_dir("state/step-3") as local:
        assert local.name == "step-3" and (local / "shard").read_text() == "s"
    if not st.is_local:
        assert not local.exists()
    with pytest.raises(FileNotFoundError, match="state/step-9"):
        with st.fetched_dir("state/step-9"):
            pass

