"""The table loader and ``hps load`` on real files in tmp_path, into real tiers (hash map, RocksDB, a
real redis-server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from hps_operator.cli import main as hps_main

from node_agent.errors import InvalidArgumentError, TableSourceError, UnavailableError
from node_agent.loader import check_unique_keys, checkpoint_path, load_model, load_table, open_source
from node_agent.local.redis_servers import RedisProcess
from node_agent.spec import TableSpec, parse_model
from node_agent.tiers import HashMapTier, RedisTier, RocksDBTier, TableLayout

DIM = 8


def _rows(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _hashmap(*tables: TableSpec) -> HashMapTier:
    return HashMapTier([TableLayout.of(t) for t in tables])


def _assert_holds(
    tier: HashMapTier | RocksDBTier | RedisTier, table: str, keys: np.ndarray, rows: np.ndarray
) -> None:
    got, found = tier.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(got, rows)


# -- formats -------------------------------------------------------------------------------------


def test_npy_directory_with_keys_loads_every_tier(tmp_path: Path) -> None:
    src = tmp_path / "users"
    src.mkdir()
    keys = np.random.default_rng(1).permutation(10**6)[:1000].astype(np.int64) - 500_000
    rows = _rows(1000)
    np.save(src / "keys.npy", keys)
    np.save(src / "vectors.npy", rows)
    table = TableSpec("users", rows=1000, dim=DIM, source="file://users")
    hashmap, rocksdb = _hashmap(table), RocksDBTier(tmp_path / "db", [TableLayout.of(table)])

    report = load_table(table, tiers=[hashmap, rocksdb], base_dir=tmp_path, chunk_rows=300)

    assert (report.format, report.rows, report.total_rows, report.resumed_from) == ("npy-dir", 1000, 1000, 0)
    assert report.bytes == 1000 * DIM * 4 and report.rows_per_s > 0
    for tier in (hashmap, rocksdb):
        _assert_holds(tier, "users", keys, rows)
        assert tier.count("users") == 1000
    rocksdb.close()


def test_npy_directory_without_keys_uses_the_row_index(tmp_path: Path) -> None:
    rows = _rows(50)
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "vectors.npy", rows)
    table = TableSpec("t", rows=50, dim=DIM, source=str(tmp_path / "t"))
    tier = _hashmap(table)
    load_table(table, tiers=[tier], chunk_rows=7)
    _assert_holds(tier, "t", np.arange(50), rows)


def test_single_npy_file_float32_into_a_float16_table_is_converted(tmp_path: Path) -> None:
    rows = _rows(40)
    np.save(tmp_path / "emb.npy", rows)
    table = TableSpec("t", rows=40, dim=DIM, dtype="float16", source="emb.npy")
    tier = _hashmap(table)
    report = load_table(table, tiers=[tier], base_dir=tmp_path)
    assert report.format == "npy" and report.bytes == 40 * DIM * 2
    _assert_holds(tier, "t", np.arange(40), rows.astype(np.float16))


def test_hugectr_sparse_model_directory(tmp_path: Path) -> None:
    src = tmp_path / "sparse0.model"
    src.mkdir()
    keys = np.arange(300, dtype="<i8") * 11 + 7
    rows = _rows(300)
    keys.tofile(src / "key")
    rows.astype("<f4").tofile(src / "emb_vector")
    table = TableSpec("t", rows=300, dim=DIM, source=f"file://{src}")
    tier = _hashmap(table)
    assert load_table(table, tiers=[tier], chunk_rows=64).format == "hugectr"
    _assert_holds(tier, "t", keys, rows)


# -- bad sources ---------------------------------------------------------------------------------


def _npy_dir(tmp_path: Path, rows: np.ndarray, keys: np.ndarray | None = None, name: str = "t") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    np.save(d / "vectors.npy", rows)
    if keys is not None:
        np.save(d / "keys.npy", keys)
    return d


@pytest.mark.parametrize(
    ("vectors", "keys", "message"),
    [
        (_rows(10, dim=4), None, r"vectors\.npy: has dim 4, the spec of 't' says dim: 8"),
        (_rows(12), None, r"vectors\.npy: has 12 rows, the spec of 't' says rows: 10"),
        (_rows(10).astype(np.float64), None, r"vectors\.npy: has dtype float64; expected float32 or float16"),
        (_rows(10)[0], None, r"vectors\.npy: expected a 2-D array"),
        (_rows(10), np.arange(9), r"keys\.npy: holds 9 keys but .*vectors\.npy holds 10 rows"),
        (_rows(10), np.arange(10.0), r"keys\.npy: expected a 1-D int64 array, got float64"),
    ],
    ids=["dim", "rows", "dtype", "not-2d", "key-count", "key-dtype"],
)
def test_mismatched_source_names_the_file_and_the_problem(
    tmp_path: Path, vectors: np.ndarray, keys: np.ndarray | None, message: str
) -> None:
    src = _npy_dir(tmp_path, vectors, keys)
    table = TableSpec("t", rows=10, dim=DIM, source=str(src))
    with pytest.raises(TableSourceError, match=message):
        open_source(table)


def test_hugectr_files_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    table = TableSpec("t", rows=10, dim=DIM, source=str(src))
    np.arange(10, dtype="<i8").tofile(src / "key")
    with pytest.raises(TableSourceError, match=r"emb_vector: missing"):
        open_source(table)
    (src / "emb_vector").write_bytes(_rows(10).tobytes()[:-4])
    with pytest.raises(TableSourceError, match=r"emb_vector: size 316 bytes is not a multiple of dim x 4"):
        open_source(table)
    (src / "emb_vector").write_bytes(_rows(9).tobytes())
    with pytest.raises(TableSourceError, match=r"emb_vector: holds 9 rows but .*key holds 10 keys"):
        open_source(table)
    (src / "key").write_bytes(b"\0" * 12)
    with pytest.raises(TableSourceError, match=r"key: size 12 bytes is not a multiple of 8"):
        open_source(table)


def test_missing_source_or_no_recognised_files(tmp_path: Path) -> None:
    with pytest.raises(TableSourceError, match=r"nowhere: source of table 't' does not exist"):
        open_source(TableSpec("t", rows=1, dim=1, source="nowhere"), base_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TableSourceError, match=r"empty: no table source found .*vectors\.npy"):
        open_source(TableSpec("t", rows=1, dim=1, source="empty"), base_dir=tmp_path)
    with pytest.raises(TableSourceError, match="has no source"):
        open_source(TableSpec("t", rows=1, dim=1))


def test_a_file_that_is_not_npy_is_named_without_numpys_pickle_hint(tmp_path: Path) -> None:
    (tmp_path / "random.npy").write_bytes(np.random.default_rng(5).bytes(4096))
    with pytest.raises(TableSourceError) as err:
        open_source(TableSpec("t", rows=1, dim=1, source="random.npy"), base_dir=tmp_path)
    message = str(err.value)
    assert message == (f"{tmp_path / 'random.npy'}: not a .npy file (it does not start with NumPy's .npy header); "
                       "write tables with numpy.save")  # fmt: skip
    assert "pickle" not in message
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(TableSourceError, match=r"empty\.npy: not a \.npy file \(it is empty\)"):
        open_source(TableSpec("t", rows=1, dim=1, source="empty.npy"), base_dir=tmp_path)


def test_corrupt_file_fails_the_load_and_the_tier_keeps_serving_the_old_rows(tmp_path: Path) -> None:
    old = _rows(100, seed=1)
    src = _npy_dir(tmp_path, old)
    table = TableSpec("t", rows=100, dim=DIM, source=str(src))
    tier = RocksDBTier(tmp_path / "db", [TableLayout.of(table)])
    load_table(table, tiers=[tier])

    # a new version of the file arrives truncated
    np.save(src / "vectors.npy", _rows(100, seed=2))
    data = (src / "vectors.npy").read_bytes()
    (src / "vectors.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(TableSourceError, match=r"vectors\.npy: file is truncated"):
        load_table(table, tiers=[tier])
    _assert_holds(tier, "t", np.arange(100), old)

    (src / "vectors.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(TableSourceError, match=r"vectors\.npy: not a \.npy file \(it does not start"):
        load_table(table, tiers=[tier])
    _assert_holds(tier, "t", np.arange(100), old)
    tier.close()


def test_one_bad_table_fails_the_model_load_before_any_row_is_written(tmp_path: Path) -> None:
    _npy_dir(tmp_path, _rows(10), name="good")
    _npy_dir(tmp_path, _rows(10, dim=3), name="bad")
    model = parse_model({
        "metadata": {"name": "m"},
        "spec": {"tables": [
            {"name": "good", "rows": 10, "dim": DIM, "source": "good"},
            {"name": "bad", "rows": 10, "dim": DIM, "source": "bad"},
            {"name": "streamed", "rows": 10, "dim": DIM},
        ]},
    })  # fmt: skip
    tier = _hashmap(*model.tables)
    with pytest.raises(TableSourceError, match="bad"):
        load_model(model, tiers=[tier], base_dir=tmp_path)
    assert tier.count("good") == 0
    with pytest.raises(InvalidArgumentError, match="no table 'nope'"):
        load_model(model, tiers=[tier], base_dir=tmp_path, tables=["nope"])
    reports = load_model(model, tiers=[tier], base_dir=tmp_path, tables=["good"])
    assert [r.table for r in reports] == ["good"] and tier.count("good") == 10


# -- duplicate keys ------------------------------------------------------------------------------


def test_duplicate_keys_in_keys_npy_fail_the_load_naming_file_count_and_keys(tmp_path: Path) -> None:
    keys = np.arange(100, 200, dtype=np.int64)
    keys[[10, 50, 70]] = [105, 105, 190]  # key 105 three times, 190 twice: 3 rows repeat a key
    src = _npy_dir(tmp_path, _rows(100), keys)
    table = TableSpec("t", rows=100, dim=DIM, source=str(src))
    tier = _hashmap(table)
    with pytest.raises(TableSourceError) as caught:
        load_table(table, tiers=[tier])
    message = str(caught.value)
    assert message.startswith(f"{src / 'keys.npy'}: 3 duplicate key(s)")
    assert "keys 105, 190" in message and "\n" not in message
    assert tier.count("t") == 0  # nothing written


def test_duplicate_keys_in_a_hugectr_key_file_fail_the_model_load_before_any_row(tmp_path: Path) -> None:
    _npy_dir(tmp_path, _rows(10), name="good")
    hugectr = tmp_path / "sparse"
    hugectr.mkdir()
    np.array([7, 3, 9, 3], dtype="<i8").tofile(hugectr / "key")
    _rows(4).tofile(hugectr / "emb_vector")
    model = parse_model({"metadata": {"name": "m"}, "spec": {"tables": [
        {"name": "good", "rows": 10, "dim": DIM, "source": "good"},
        {"name": "sparse", "rows": 4, "dim": DIM, "source": "sparse"},
    ]}})  # fmt: skip
    tier = _hashmap(*model.tables)
    with pytest.raises(TableSourceError, match=r"sparse/key: 1 duplicate key\(s\) among 4 rows.*keys 3$"):
        load_model(model, tiers=[tier], base_dir=tmp_path)
    assert tier.count("good") == 0 and tier.count("sparse") == 0


def test_distinct_keys_of_any_integer_dtype_load(tmp_path: Path) -> None:
    keys = np.array([-5, 0, 2**31 - 1, -(2**31), 42], dtype=np.int32)  # extremes stay distinct as int64
    src = _npy_dir(tmp_path, _rows(5), keys)
    table = TableSpec("t", rows=5, dim=DIM, source=str(src))
    tier = _hashmap(table)
    assert load_table(table, tiers=[tier]).rows == 5
    _assert_holds(tier, "t", keys.astype(np.int64), _rows(5))


@pytest.mark.parametrize("duplicates", [0, 1, 37])
def test_a_key_file_larger_than_the_memory_bound_is_checked_through_bucket_files(
    tmp_path: Path, duplicates: int
) -> None:
    """A 64 KiB bound holds 2048 keys, so 20000 keys go through the hash-bucketed path; the result
    is the same as a whole-array check."""
    rng = np.random.default_rng(7)
    keys = rng.permutation(np.arange(-10_000, 10_000, dtype=np.int64) * 4096)  # structured low bits
    where = rng.choice(len(keys), size=2 * duplicates, replace=False)
    keys[where[:duplicates]] = keys[where[duplicates:]]
    np.save(tmp_path / "keys.npy", keys)
    mapped = np.load(tmp_path / "keys.npy", mmap_mode="r")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if not duplicates:
        check_unique_keys(mapped, tmp_path / "keys.npy", memory=64 * 1024, spill_dir=scratch)
    else:
        with pytest.raises(TableSourceError) as caught:
            check_unique_keys(mapped, tmp_path / "keys.npy", memory=64 * 1024, spill_dir=scratch)
        values, counts = np.unique(keys, return_counts=True)
        smallest = ", ".join(str(k) for k in values[counts > 1][:5])
        assert f": {duplicates} duplicate key(s) among 20000 rows" in str(caught.value)
        assert f"keys {smallest}" in str(caught.value)
    assert list(scratch.iterdir()) == []  # the bucket files are removed


def test_cli_duplicate_keys_exit_with_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _npy_dir(tmp_path, _rows(10), np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1]), name="users")
    model_file = _model_file(tmp_path, [{"name": "users", "rows": 10, "dim": DIM, "source": "users"}])
    assert hps_main(["load", "-f", str(model_file), "--rocksdb", str(tmp_path / "db"), "--no-progress"]) == 6
    err = capsys.readouterr().err
    assert "users/keys.npy: 1 duplicate key(s) among 10 rows" in err and "keys 1" in err
    assert err.count("\n") == 1
    rocksdb = RocksDBTier(tmp_path / "db", [TableLayout("users", DIM, np.dtype(np.float32))], read_only=True)
    assert not rocksdb.fetch("users", np.arange(1, 10))[1].any()  # no row written
    rocksdb.close()
    assert hps_main(["load", "-f", str(model_file), "--check"]) == 6  # --check finds it too
    assert "duplicate key" in capsys.readouterr().err


# -- resuming ------------------------------------------------------------------------------------


class _TierThatDiesAfter(HashMapTier):
    """A real hash map tier that becomes unreachable after ``inserts`` inserts: a store going down
    mid-load, injected at a chosen chunk so the test is deterministic."""

    def __init__(self, layouts: list[TableLayout], inserts: int) -> None:
        super().__init__(layouts)
        self.left = inserts

    def insert(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        if self.left == 0:
            raise UnavailableError("store went away")
        self.left -= 1
        super().insert(table, keys, values)


def test_an_interrupted_load_resumes_after_the_last_written_chunk(tmp_path: Path) -> None:
    rows = _rows(1000)
    src = _npy_dir(tmp_path, rows)
    table = TableSpec("t", rows=1000, dim=DIM, source=str(src))
    layouts = [TableLayout.of(table)]
    checkpoint = tmp_path / "ckpt" / "t.json"

    dying = _TierThatDiesAfter(layouts, inserts=4)
    with pytest.raises(UnavailableError):
        load_table(table, tiers=[dying], chunk_rows=100, checkpoint=checkpoint)
    assert json.loads(checkpoint.read_text())["rowsDone"] == 400

    # the store is back (it kept what it had); the re-run skips the four chunks already written
    dying.left = -1
    report = load_table(table, tiers=[dying], chunk_rows=100, checkpoint=checkpoint)
    assert (report.resumed_from, report.rows, report.total_rows) == (400, 600, 1000)
    _assert_holds(dying, "t", np.arange(1000), rows)
    assert not checkpoint.exists()  # done: a later run loads everything again


def test_a_changed_source_or_other_tiers_do_not_resume(tmp_path: Path) -> None:
    src = _npy_dir(tmp_path, _rows(500))
    table = TableSpec("t", rows=500, dim=DIM, source=str(src))
    checkpoint = tmp_path / "t.json"
    dying = _TierThatDiesAfter([TableLayout.of(table)], inserts=2)
    with pytest.raises(UnavailableError):
        load_table(table, tiers=[dying], chunk_rows=100, checkpoint=checkpoint)

    np.save(src / "vectors.npy", _rows(500, seed=9))  # a new version of the table
    os.utime(src / "vectors.npy", ns=(1, 1))
    fresh = _hashmap(table)
    report = load_table(table, tiers=[fresh], chunk_rows=100, checkpoint=checkpoint)
    assert report.resumed_from == 0 and report.rows == 500
    _assert_holds(fresh, "t", np.arange(500), _rows(500, seed=9))


# -- hps load ------------------------------------------------------------------------------------


def _model_file(tmp_path: Path, tables: list[dict[str, object]]) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel",
        "metadata": {"name": "dlrm"}, "spec": {"tables": tables},
    }))  # fmt: skip
    return path


def test_cli_loads_into_redis_and_rocksdb(
    tmp_path: Path,
    redis_server: RedisProcess,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = _rows(200)
    _npy_dir(tmp_path, rows, name="users")
    model_file = _model_file(tmp_path, [{"name": "users", "rows": 200, "dim": DIM, "source": "file://users"}])
    monkeypatch.setenv("HPS_TEST_REDIS_PASSWORD", "test-secret")

    code = hps_main([
        "load", "-f", str(model_file), "--redis", redis_server.address,
        "--redis-password-env", "HPS_TEST_REDIS_PASSWORD", "--rocksdb", str(tmp_path / "db"),
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--no-progress", "-o", "json",
    ])  # fmt: skip

    assert code == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert (report["table"], report["rows"], report["format"]) == ("users", 200, "npy-dir")
    layout = [TableLayout("users", DIM, np.dtype(np.float32))]
    redis_tier = RedisTier(layout, addresses=[redis_server.address], access=redis_server.access, model="dlrm")
    rocksdb = RocksDBTier(tmp_path / "db", layout, read_only=True)
    for tier in (redis_tier, rocksdb):
        _assert_holds(tier, "users", np.arange(200), rows)
    redis_tier.evict("users")
    redis_tier.close()
    rocksdb.close()
    assert not checkpoint_path(tmp_path / "ckpt", "dlrm", "users").exists()


def test_a_second_load_of_the_same_source_keeps_the_online_updates_applied_since(
    tmp_path: Path, redis_server: RedisProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader Job renamed by a spec change runs again: tables Redis records as loaded from the very
    same files are left alone, so rows updated online since keep their new values; a new source
    file, or --force, loads the table again."""
    rows = _rows(50)
    _npy_dir(tmp_path, rows, name="items")
    model_file = _model_file(tmp_path, [{"name": "items", "rows": 50, "dim": DIM, "source": "file://items"}])
    monkeypatch.setenv("HPS_TEST_REDIS_PASSWORD", "test-secret")
    args = ["load", "-f", str(model_file), "--redis", redis_server.address,
            "--redis-password-env", "HPS_TEST_REDIS_PASSWORD", "--no-progress", "-o", "json"]  # fmt: skip
    layout = [TableLayout("items", DIM, np.dtype(np.float32))]
    tier = RedisTier(layout, addresses=[redis_server.address], access=redis_server.access, model="dlrm")
    try:
        assert hps_main(args) == 0 and len(json.loads(capsys.readouterr().out)) == 1
        updated = np.full((1, DIM), 7.0, dtype=np.float32)
        tier.insert("items", np.array([3]), updated)  # an online update of row 3

        assert hps_main(args) == 0
        assert json.loads(capsys.readouterr().out) == []  # nothing loaded: the same source
        _assert_holds(tier, "items", np.array([3]), updated)

        assert hps_main([*args, "--force"]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 1
        _assert_holds(tier, "items", np.array([3]), rows[3:4])  # --force wrote the source's row back

        tier.insert("items", np.array([3]), updated)
        _npy_dir(tmp_path, rows + 1, name="items")  # new weights from training: a new source
        assert hps_main(args) == 0
        assert len(json.loads(capsys.readouterr().out)) == 1
        _assert_holds(tier, "items", np.array([3]), rows[3:4] + 1)
    finally:
        tier.evict("items")
        redis_server.client().delete("hps:{dlrm}:loaded")
        tier.close()


def test_cli_bad_source_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _npy_dir(tmp_path, _rows(10, dim=3), name="users")
    model_file = _model_file(tmp_path, [{"name": "users", "rows": 10, "dim": DIM, "source": "users"}])
    assert hps_main(["load", "-f", str(model_file), "--rocksdb", str(tmp_path / "db"), "--no-progress"]) == 6
    err = capsys.readouterr().err
    assert "vectors.npy: has dim 3" in err and err.count("\n") == 1
    assert hps_main(["load", "-f", str(model_file), "--no-progress"]) == 2  # no store named
    assert "nothing to load into" in capsys.readouterr().err


def test_cli_check_reads_sources_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _npy_dir(tmp_path, _rows(10), name="users")
    model_file = _model_file(tmp_path, [{"name": "users", "rows": 10, "dim": DIM, "source": "users"}])
    assert hps_main(["load", "-f", str(model_file), "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["TABLE", "FORMAT", "ROWS", "SOURCE"]
    assert out[1].split()[:3] == ["users", "npy-dir", "10"]
