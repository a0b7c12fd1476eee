"""Text from tables: Parquet, Arrow (IPC file / Feather v2, and the IPC streams `datasets` caches as .arrow), CSV,
and Hugging Face datasets (`hf:NAME[:CONFIG][:SPLIT]`, streamed). One row = one document, read from one text column.

Files are streamed by record batches (never loaded whole); pyarrow and datasets are optional:
`pip install 'lmstack[data]'`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import LMStackError

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc", ".csv")
BATCH_ROWS = 1024
CSV_BLOCK_BYTES = 1 << 22  # 4 MB blocks of the CSV streaming reader
INSTALL_HINT = "pip install 'lmstack[data]'"


def is_table_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def _pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise LMStackError(f"reading Parquet/Arrow/CSV corpora needs pyarrow: {INSTALL_HINT}") from None
    return pyarrow


def _missing_column(path, column: str, names) -> LMStackError:
    return LMStackError(f"{path}: no text column {column!r}; the columns are {', '.join(map(repr, names)) or '(none)'}"
                        f" (choose one with text_column, e.g. --corpus '{path}#text_column={next(iter(names), 'text')}')")


def _batches(path: Path, column: str):
    """(schema, iterator of record batches holding `column`) for one table file."""
    pa = _pyarrow()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        f = pq.ParquetFile(path)
        schema = f.schema_arrow
        if column not in schema.names:
            raise _missing_column(path, column, schema.names)
        return schema, f.iter_batches(batch_size=BATCH_ROWS, columns=[column])
    if suffix == ".csv":
        import pyarrow.csv as pcsv
        # read the header first, so a missing column is reported before any type inference
        header = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES))
        names = header.schema.names
        if column not in names:
            raise _missing_column(path, column, names)
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                               convert_options=pcsv.ConvertOptions(include_columns=[column],
                                                                   column_types={column: pa.string()},
                                                                   strings_can_be_null=False))
        return reader.schema, iter(reader)
    import pyarrow.ipc as ipc
    source = pa.memory_map(str(path), "r")
    try:
        reader = ipc.open_file(source)          # Arrow IPC file format (Feather v2)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        reader = ipc.open_stream(source)        # IPC stream format (what `datasets` writes as .arrow)
        batches = iter(reader)
    if column not in reader.schema.names:
        raise _missing_column(path, column, reader.schema.names)
    return reader.schema, batches


def iter_table_file(path: str | Path, column: str = "text") -> Iterator[str]:
    """Every non-null value of `column`, in row order, one record batch in memory at a time."""
    pa = _pyarrow()
    path = Path(path)
    try:
        schema, batches = _batches(path, column)
        typ = schema.field(column).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise LMStackError(f"{path}: column {column!r} holds {typ}, not text; choose a string column with "
                               "text_column")
        for batch in batches:
            col = batch.column(batch.schema.get_field_index(column))
            for value in col.to_pylist():
                if value is not None:
                    yield value
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise LMStackError(f"{path}: cannot read it as {path.suffix.lstrip('.')} ({e})") from None


# ---- Hugging Face datasets --------------------------------------------------------------------
def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][:SPLIT]' -> (name, config or None, split, default 'train'). NAME may be a local path."""
    body = spec[3:]
    name, _, rest = body.partition(":")
    config, _, split = rest.partition(":")
    if not name:
        raise LMStackError(f"corpus {spec!r}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:roneneldan/TinyStories or "
                           "hf:wikitext:wikitext-2-raw-v1:train")
    return name, config or None, split or "train"


def load_hf_stream(name: str, config: str | None, split: str):
    """datasets.load_dataset(..., streaming=True) for a hub name, a local dataset directory or local data files."""
    try:
        import datasets
    except ImportError:
        raise LMStackError(f"hf: corpora need the datasets library: {INSTALL_HINT}") from None
    p = Path(name)
    kwargs = {"split": split, "streaming": True}
    if p.is_file() or (not p.exists() and any(c in name for c in "*?[")):
        files = str(p)
        suffix = Path(files).suffix.lower()
        builder = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".txt": "text",
                   ".arrow": "arrow"}.get(suffix)
        if builder is None:
            raise LMStackError(f"hf:{name}: cannot tell the file format from {suffix!r}; use .parquet/.csv/.jsonl/"
                               ".txt/.arrow files or a dataset directory")
        args, kwargs["data_files"] = (builder,), {split: files}
    else:
        args = (str(p),) if p.exists() else (name,)
        if config:
            args += (config,)
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline, unknown name, bad config/split: datasets raises many kinds
        raise hf_error(name, e) from None


def hf_error(name: str, e: Exception) -> LMStackError:
    return LMStackError(
        f"could not stream the Hugging Face dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}). "
        "If you are offline or the hub is unreachable, download the data once while online (or copy its files here) "
        "and pass them locally: --corpus 'data/*.parquet' (or .arrow/.csv/.jsonl), or hf:/path/to/dataset_dir "
        "(HF_HUB_OFFLINE=1 skips the network retries); otherwise check the dataset name, config and split")


def iter_hf(spec: str, column: str = "text") -> Iterator[str]:
    name, config, split = parse_hf_spec(spec)
    ds = load_hf_stream(name, config, split)
    it = iter(ds)
    try:
        first = next(it, None)
    except Exception as e:
        raise hf_error(name, e) from None
    if first is None:
        return
    if column not in first:
        raise LMStackError(f"{spec}: no text column {column!r}; the columns are "
                           f"{', '.join(map(repr, first)) or '(none)'} (choose one with text_column, e.g. "
                           f"--corpus '{spec}#text_column={next(iter(first), 'text')}')")
    rec = first
    while rec is not None:
        value = rec.get(column)
        if value is not None:
            if not isinstance(value, str):
                raise LMStackError(f"{spec}: column {column!r} holds {type(value).__name__}, not text; choose a "
                                   "string column with text_column")
            yield value
        try:
            rec = next(it, None)
        except Exception as e:
            raise hf_error(name, e) from None
