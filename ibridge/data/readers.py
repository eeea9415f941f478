"""Raw rows from local files, ``datasets`` folders and the Hugging Face hub.

Each reader yields ``(row, origin)`` pairs; ``origin`` says where the row came
from in the words error messages use: ``path, line N`` (JSONL, 1-based),
``path, row N`` (Parquet, JSON arrays and ``datasets`` rows, 0-based as pandas
and ``datasets`` number them).

Accepted locations (``data.path`` / ``data.heldout_path``):

- a ``.jsonl`` file (one JSON object a line), a ``.json`` file (an array of
  objects, or JSON lines), a ``.parquet`` file;
- a folder holding such files, searched recursively (hidden folders such as
  ``.cache`` skipped). When a split is asked for and some files are named after
  it (``train_sft-00000-of-00003.parquet``, ``test_sft.jsonl``, ``train_sft/…``),
  as in a snapshot of a hub dataset repository, only those are read;
- a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` by split
  name, or a single ``Dataset``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ibridge.data.schema import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")

Rows = Iterator[tuple[object, str]]


def check_location(path: Path, key: str) -> None:
    """Fail early (at config validation) on a path that cannot hold data."""
    if path.is_file() and path.suffix not in DATA_SUFFIXES:
        raise DataError(f"{key}={path}: expected a .jsonl, .json or .parquet file, or a folder of them")


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _in_split(relative: Path, split: str) -> bool:
    if split in relative.parts[:-1]:
        return True
    name = relative.name
    if not name.startswith(split):
        return False
    rest = name[len(split):]
    return rest[:1] in ("-", ".", "")


def data_files(folder: Path, split: str | None = None) -> list[Path]:
    """Data files under `folder`, sorted; with `split`, only those named after it."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if split is None:
        return files
    return [p for p in files if _in_split(p.relative_to(folder), split)]


def file_rows(path: Path) -> Rows:
    """Rows of one data file, by its suffix."""
    if path.suffix == ".parquet":
        yield from parquet_rows(path)
    elif path.suffix == ".json":
        yield from json_rows(path)
    elif path.suffix == ".jsonl":
        yield from jsonl_rows(path)
    else:
        raise DataError(f"{path}: expected a .jsonl, .json or .parquet file")


def jsonl_rows(path: Path) -> Rows:
    with path.open(encoding="utf-8") as handle:
        line_no = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, line {line_no + 1}: not UTF-8 text ({err.reason})") from None
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
            yield row, f"{path}, line {line_no}"


def json_rows(path: Path) -> Rows:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines under a .json name, as `datasets` also accepts
            yield from jsonl_rows(path)
            return
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if isinstance(data, dict):
        yield data, f"{path}, row 0"
        return
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield row, f"{path}, row {i}"


def parquet_rows(path: Path, batch_size: int = 512) -> Rows:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(str(path))
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield row, f"{path}, row {index}"
            index += 1


def saved_dataset_rows(folder: Path, split: str | None, required: bool) -> Rows | None:
    """Rows of a ``save_to_disk`` folder; None when it has no such split and none is required."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise DataError(f"{folder}: not a readable datasets folder ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            if required:
                raise DataError(f"{folder}: no split {split!r}; it has {', '.join(loaded) or 'none'}")
            return None
        dataset, label = loaded[split], f"{folder}[{split}]"
    elif required:
        dataset, label = loaded, str(folder)
    else:
        return None  # one Dataset: all of it is the training split
    return ((row, f"{label}, row {i}") for i, row in enumerate(dataset))


def hub_rows(name: str, split: str) -> Rows:
    """Rows of a hub dataset's split, through ``datasets.load_dataset`` (and its cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"{name}[{split}]: could not load from the Hugging Face hub ({type(err).__name__}: {err}); "
            f"set data.path to a local copy (docs/real_setting.md)"
        ) from None
    return ((row, f"{name}[{split}], row {i}") for i, row in enumerate(dataset))


def location_rows(path: Path, split: str | None, required: bool) -> tuple[Rows | None, str]:
    """Rows at a local path for `split`, and a label naming it.

    A folder without files named after `split` gives all its files when `required`
    (it is the training data) and None otherwise (no held-out split there).
    """
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        return file_rows(path), str(path)
    if is_saved_dataset(path):
        return saved_dataset_rows(path, split, required), f"{path}[{split}]" if split else str(path)
    files = data_files(path, split) if split else []
    label = f"{path} ({split} files)"
    if not files:
        if not required:
            return None, str(path)
        files, label = data_files(path), str(path)
        if not files:
            raise DataError(f"{path}: no .jsonl, .json or .parquet files, and not a datasets save_to_disk folder")
    return (row for file in files for row in file_rows(file)), label
