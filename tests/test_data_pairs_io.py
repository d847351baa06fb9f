"""The stack-exchange-paired schema on disk: writing, reading files/folders/globs, and clear errors."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_engine.data.pairs_io import PAIR_COLUMNS, PairsFormatError, PairWriter, pair_files, read_pairs

ROWS = [dict(qid=i, question=f"q{i}", date="2020/01/02",
             metadata=[f"https://s/questions/{i}", "https://s", "CC BY-SA 4.0"],
             response_j=f"good {i} \u2014 caf\u00e9", response_k=f"bad {i}") for i in range(5)]


def write_rows(folder, rows, jsonl=False, rows_per_group=2):
    folder.mkdir(parents=True, exist_ok=True)
    writer = PairWriter(str(folder / "pairs.parquet"), str(folder / "pairs.jsonl") if jsonl else None, rows_per_group)
    for row in rows:
        writer.write(row)
    writer.close()
    return folder


def test_round_trip_parquet_and_jsonl(tmp_path):
    folder = write_rows(tmp_path / "d", ROWS, jsonl=True)
    assert read_pairs(folder / "pairs.parquet").to_pylist() == ROWS
    assert read_pairs(folder / "pairs.jsonl").to_pylist() == ROWS
    assert pq.read_metadata(folder / "pairs.parquet").num_row_groups == 3  # 2 + 2 + 1 rows
    narrow = read_pairs(folder / "pairs.jsonl", columns=("question", "response_k"))
    assert narrow.column_names == ["question", "response_k"]


def test_an_empty_split_is_a_valid_empty_file(tmp_path):
    folder = write_rows(tmp_path / "d", [])
    table = read_pairs(folder)
    assert table.num_rows == 0 and table.column_names == list(PAIR_COLUMNS)


def test_published_layout_folders_and_globs(tmp_path):
    # Like a local copy of lvwerra/stack-exchange-paired: data/{split}/*.parquet, narrower integer
    # qid and an extra pandas index column.
    for split, chunk in (("finetune", ROWS[:2]), ("rl", ROWS[2:])):
        for i, row in enumerate(chunk):
            table = pa.Table.from_pylist([row]).set_column(0, "qid", pa.array([row["qid"]], pa.int32()))
            table = table.append_column("__index_level_0__", pa.array([i]))
            (tmp_path / "data" / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, tmp_path / "data" / split / f"train-{i:05d}-of-00002.parquet")
    assert read_pairs(tmp_path / "data" / "finetune").to_pylist() == ROWS[:2]
    assert read_pairs(str(tmp_path / "data" / "*" / "*.parquet")).to_pylist() == ROWS
    assert read_pairs([tmp_path / "data" / "rl", tmp_path / "data" / "finetune"])["qid"].to_pylist() == [2, 3, 4, 0, 1]
    assert read_pairs(tmp_path / "data").num_rows == 5  # recursive


def test_a_folder_with_both_formats_reads_parquet_only(tmp_path):
    folder = write_rows(tmp_path / "d", ROWS, jsonl=True)
    assert pair_files(folder) == [str(folder / "pairs.parquet")]
    (folder / "pairs.parquet").unlink()
    assert pair_files(folder) == [str(folder / "pairs.jsonl")]


@pytest.mark.parametrize("source, message", [
    ("nothing/here.parquet", "no such file or folder"),
    ("nothing/*.parquet", "pattern matches no files"),
])
def test_missing_sources(tmp_path, source, message):
    with pytest.raises(FileNotFoundError, match=message):
        read_pairs(str(tmp_path / source))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: folder holds no .parquet or .jsonl files"):
        read_pairs(tmp_path / "empty")


def test_parquet_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS).drop_columns(["response_k"]), path)
    with pytest.raises(PairsFormatError, match=r"p\.parquet has no column 'response_k'"):
        read_pairs(path)
    assert read_pairs(path, columns=("question", "response_j")).num_rows == 5


def test_parquet_wrong_type_and_nulls(tmp_path):
    bad_type = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS).set_column(0, "qid", pa.array(["x"] * 5)), bad_type)
    with pytest.raises(PairsFormatError, match=r"t\.parquet: column 'qid' has type string, expected int64"):
        read_pairs(bad_type)
    nulls = tmp_path / "n.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS).set_column(4, "response_j", pa.array(["a", None, "b", None, "c"])), nulls)
    with pytest.raises(PairsFormatError, match=r"n\.parquet: column 'response_j' has 2 null values"):
        read_pairs(nulls)


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(PairsFormatError, match=r"x\.parquet is not a readable parquet file"):
        read_pairs(path)


@pytest.mark.parametrize("lines, message", [
    ([json.dumps(ROWS[0]), "{not json"], r"j\.jsonl, line 2: not valid JSON"),
    ([json.dumps(ROWS[0]), "[1, 2]"], r"j\.jsonl, line 2: expected a JSON object"),
    ([json.dumps({k: v for k, v in ROWS[0].items() if k != "date"})], r"j\.jsonl, line 1: no column 'date'"),
    ([json.dumps(dict(ROWS[0], qid="seven"))], r"j\.jsonl: column 'qid' holds a value that is not int64"),
    ([json.dumps(dict(ROWS[0], metadata="one string"))], r"column 'metadata' holds a value that is not list"),
    ([json.dumps(dict(ROWS[0], response_k=None))], r"column 'response_k' has 1 null values"),
])
def test_jsonl_errors_name_file_line_and_column(tmp_path, lines, message):
    path = tmp_path / "j.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PairsFormatError, match=message):
        read_pairs(path)


def test_jsonl_not_utf8(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(PairsFormatError, match=r"j\.jsonl: not UTF-8"):
        read_pairs(path)


def test_unknown_column_request():
    with pytest.raises(ValueError, match="unknown pairs column 'chosen'"):
        read_pairs("anything", columns=("chosen",))
