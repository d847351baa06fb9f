"""Reading and writing preference pairs in the `stack-exchange-paired` schema (parquet or JSON lines).

Schema (lvwerra/stack-exchange-paired, used by StackLLaMA): one row per pair,
    qid: int64            question id on its site
    question: string      title and body, Markdown
    date: string          question creation date, "YYYY/MM/DD"
    metadata: list<string> [question URL, site URL, license]  (StackExchange content is CC BY-SA)
    response_j: string    the better answer, Markdown
    response_k: string    the worse answer, Markdown

`read_pairs` takes files, folders and globs, so a local copy of the published dataset laid out as
`data/finetune/*.parquet`, `data/reward/*.parquet`, ... reads split by split. Extra columns are ignored.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

PAIR_SCHEMA = pa.schema([
    ("qid", pa.int64()),
    ("question", pa.string()),
    ("date", pa.string()),
    ("metadata", pa.list_(pa.string())),
    ("response_j", pa.string()),
    ("response_k", pa.string()),
])
PAIR_COLUMNS = tuple(PAIR_SCHEMA.names)
TEXT_COLUMNS = ("question", "response_j", "response_k")


class PairsFormatError(ValueError):
    """A pairs file that cannot be read, lacks a column, or holds a value of the wrong type."""


class PairWriter:
    """Streams rows into a parquet file (and optionally a JSON-lines file) in row groups.

    The parquet file is created with its schema at once, so a split with no rows is still a valid,
    empty file. Callers write to temporary paths and rename them into place when the whole run has
    succeeded (see data/prepare.py), so a failed run never leaves half a file where a reader looks.
    """

    def __init__(self, parquet_path: str, jsonl_path: str | None = None, rows_per_group: int = 8192):
        self.parquet = pq.ParquetWriter(parquet_path, PAIR_SCHEMA)
        self.jsonl = open(jsonl_path, "w", encoding="utf-8") if jsonl_path else None
        self.rows_per_group = rows_per_group
        self.buffer: dict[str, list] = {name: [] for name in PAIR_COLUMNS}
        self.rows = 0

    def write(self, row: dict):
        for name in PAIR_COLUMNS:
            self.buffer[name].append(row[name])
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({name: row[name] for name in PAIR_COLUMNS}, ensure_ascii=False) + "\n")
        self.rows += 1
        if len(self.buffer["qid"]) >= self.rows_per_group:
            self._flush()

    def _flush(self):
        if self.buffer["qid"]:
            self.parquet.write_table(pa.Table.from_pydict(self.buffer, schema=PAIR_SCHEMA))
            self.buffer = {name: [] for name in PAIR_COLUMNS}

    def close(self):
        self._flush()
        self.parquet.close()
        if self.jsonl is not None:
            self.jsonl.close()


# ---- reading ------------------------------------------------------------------------------------

def pair_files(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The files that `sources` name: files as given, folders searched recursively, globs expanded.

    A folder contributes its .parquet files, or its .jsonl files if it has no parquet: `prepare
    --jsonl` writes both formats side by side, and reading both would count every pair twice.
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    files: list[str] = []
    for source in map(os.fspath, sources):
        if os.path.isdir(source):
            found = sorted(glob.glob(os.path.join(glob.escape(source), "**", "*.parquet"), recursive=True))
            found = found or sorted(glob.glob(os.path.join(glob.escape(source), "**", "*.jsonl"), recursive=True))
            if not found:
                raise FileNotFoundError(f"{source}: folder holds no .parquet or .jsonl files")
        elif glob.has_magic(source):
            found = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"{source}: pattern matches no files")
        elif os.path.isfile(source):
            found = [source]
        else:
            raise FileNotFoundError(f"{source}: no such file or folder")
        files.extend(found)
    if not files:
        raise FileNotFoundError("no pairs files given")
    return files


def read_pairs(sources, columns: Sequence[str] = PAIR_COLUMNS, min_rows: int = 0) -> pa.Table:
    """The named columns of every file in `sources` as one table with the types of PAIR_SCHEMA; fewer than
    `min_rows` rows in all is an error naming the files (a training stage passes 1)."""
    unknown = [c for c in columns if c not in PAIR_COLUMNS]
    if unknown:
        raise ValueError(f"unknown pairs column {unknown[0]!r}; the schema has {', '.join(PAIR_COLUMNS)}")
    schema = pa.schema([PAIR_SCHEMA.field(c) for c in columns])
    tables = []
    files = pair_files(sources)
    for path in files:
        table = _read_jsonl(path, schema) if path.endswith(".jsonl") else _read_parquet(path, schema)
        for name in TEXT_COLUMNS:
            if name in table.column_names and table[name].null_count:
                raise PairsFormatError(f"{path}: column {name!r} has {table[name].null_count} null values")
        tables.append(table)
    table = pa.concat_tables(tables)
    if table.num_rows < min_rows:
        where = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
        raise PairsFormatError(f"{where} has {table.num_rows} rows" + (f"; need at least {min_rows}" if min_rows > 1
                                                                       else ""))
    return table


def _read_parquet(path: str, schema: pa.Schema) -> pa.Table:
    try:
        names = pq.read_schema(path).names
        missing = [c for c in schema.names if c not in names]
        if missing:
            raise PairsFormatError(f"{path} has no column {missing[0]!r} (it has {', '.join(names)})")
        table = pq.read_table(path, columns=schema.names)
    except (pa.ArrowException, OSError) as e:
        raise PairsFormatError(f"{path} is not a readable parquet file: {e}") from None
    return pa.table([_cast(path, table[f.name], f) for f in schema], schema=schema)


def _lossless(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column of type `have` holds the same kind of value as `want` (integers of any width,
    text of any layout, lists of such, or nulls), so that a cast only changes the layout. Arrow would
    also turn numbers into text, and a stage would train on the digits."""
    if pa.types.is_null(have):
        return True
    if pa.types.is_integer(want):
        return pa.types.is_integer(have)
    if pa.types.is_string(want):
        return pa.types.is_string(have) or pa.types.is_large_string(have) or str(have) == "string_view"
    if pa.types.is_list(want):
        return (pa.types.is_list(have) or pa.types.is_large_list(have)) and _lossless(have.value_type, want.value_type)
    return have == want


def _cast(path: str, column: pa.ChunkedArray, field: pa.Field) -> pa.ChunkedArray:
    wrong = PairsFormatError(f"{path}: column {field.name!r} has type {column.type}, expected {field.type}")
    if not _lossless(column.type, field.type):
        raise wrong
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise wrong from None


def _read_jsonl(path: str, schema: pa.Schema) -> pa.Table:
    values: dict[str, list] = {name: [] for name in schema.names}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PairsFormatError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise PairsFormatError(f"{path}, line {line_no}: expected a JSON object")
                for name in schema.names:
                    if name not in row:
                        raise PairsFormatError(f"{path}, line {line_no}: no column {name!r}")
                    values[name].append(row[name])
        except UnicodeDecodeError as e:
            raise PairsFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
    columns = []
    for f in schema:
        column, array = values[f.name], None
        # pyarrow would read a string as a list of its characters, so list columns are checked first.
        if not (pa.types.is_list(f.type) and any(v is not None and not isinstance(v, list) for v in column)):
            try:
                array = pa.array(column, type=f.type)
            except (TypeError, pa.ArrowInvalid):  # ArrowTypeError is a TypeError
                pass
        if array is None:
            raise PairsFormatError(f"{path}: column {f.name!r} holds a value that is not {f.type}")
        columns.append(array)
    return pa.table(columns, schema=schema)
