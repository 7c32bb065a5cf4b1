"""Training data for the recipes: GLUE tasks from the Hub (``datasets``), local tsv/csv/jsonl
tables, the bundled SST-2 sample, and text corpora tokenized and packed into fixed-length blocks.

Every problem the user can fix (missing file, unreadable file, wrong column, no network) raises
:class:`~finegates.app.errors.UsageError` with a message that says what to do.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import UsageError
from .glue import GLUE_TASKS

__all__ = [
    "BUNDLED_SST2",
    "read_table",
    "load_classification",
    "tokenize_classification",
    "load_text_corpus",
    "pack_blocks",
]

# SST-2 sample shipped with the package (see data/sst2/PROVENANCE.md).
BUNDLED_SST2 = Path(__file__).resolve().parent.parent / "data" / "sst2"
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")


def _check_file(path, what: str) -> Path:
    """The path as a readable file, or an error that says what it is instead."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    if p.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a directory, not a file")
    if not p.is_file():
        raise UsageError(f"{what} {str(path)!r} is not a file")
    return p


def read_table(path, what: str = "data file", header: bool = True):
    """A tsv/csv/jsonl file as a ``datasets.Dataset`` (through pandas, in memory, no cache files).
    tsv files are read without quote handling, as GLUE writes them. ``header=False``: a tsv/csv
    without a header row, its columns named by position (``"0"``, ``"1"``, ...)."""
    return _to_dataset(_read_frame(path, what, header))


def _read_frame(path, what: str, header: bool):
    """The table as a pandas DataFrame: its cells are checked before Arrow types the columns."""
    import pandas as pd

    p = _check_file(path, what)
    suffix = p.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UsageError(f"{what} {str(path)!r}: unknown format {suffix!r}; use a .tsv, .csv or .jsonl file")
    try:
        if suffix == ".tsv":
            df = pd.read_csv(p, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, on_bad_lines="error",
                             header=0 if header else None)
        elif suffix == ".csv":
            df = pd.read_csv(p, keep_default_na=False, on_bad_lines="error", header=0 if header else None)
        else:
            # a BOM as for csv; each cell keeps its JSON type (pandas' inference read a stray true as 1)
            df = pd.read_json(p, lines=(suffix == ".jsonl"), encoding="utf-8-sig", dtype=False)
    except Exception as e:  # pandas raises many types for a malformed file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} {str(path)!r} is not a readable {suffix[1:]} table ({msg})") from None
    if len(df) == 0:
        raise UsageError(f"{what} {str(path)!r} has no rows")
    df.columns = [str(c) for c in df.columns]
    return df


def _to_dataset(df):
    """A ``datasets.Dataset`` of the frame; a column of mixed types (1 and "pos" in one jsonl
    column), which Arrow cannot type, goes in as its text form."""
    from datasets import Dataset

    for c in df.columns:
        if df[c].dtype == object and len({type(v) for v in df[c] if not _missing(v)}) > 1:
            df[c] = [v if _missing(v) else str(v) for v in df[c]]
    return Dataset.from_pandas(df, preserve_index=False)


def _check_columns(names: Sequence[str], columns: Sequence[str], path, flag: str, header: bool = True) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        hint = ("; a file without a header row needs --no-header and column positions "
                "(e.g. --text-columns 0 --label-column 1)") if header else ""
        raise UsageError(
            f"{str(path)!r} has no column {missing[0]!r} (columns: {', '.join(names)}); set {flag}{hint}"
        )


def load_classification(
    task: Optional[str],
    train_file: Optional[str],
    validation_file: Optional[str],
    text_columns: Optional[Sequence[str]],
    label_column: str,
    dataset_cache: Optional[str] = None,
    header: bool = True,
):
    """Returns ``(train, validation, text_columns, num_labels, label_names)`` with the labels in a
    ``labels`` column (class ids, or floats for regression; ``num_labels == 1``).

    Local files (``train_file``) take precedence over the Hub; the ``task`` then only names the
    metric and default columns. ``header=False``: tsv/csv files without a header row, whose columns
    are then named by position (``text_columns=("0",)``, ``label_column="1"``). Labels of local files that are not integers are mapped to ids in
    sorted order of the training file's values."""
    info = GLUE_TASKS.get(task) if task else None
    cols = tuple(text_columns) if text_columns else (info.text_columns if info else ("sentence",))
    if len(cols) not in (1, 2):
        raise UsageError(f"--text-columns takes one or two column names, got {len(cols)}")
    if train_file:
        if not validation_file:
            raise UsageError("--train-file needs --validation-file (the data the metric is computed on)")
        return _load_local(info, train_file, validation_file, cols, label_column, header)
    if not task:
        raise UsageError("give a GLUE task name (--task) or local data (--train-file/--validation-file)")
    try:
        from datasets import load_dataset

        raw = load_dataset("nyu-mll/glue", task, cache_dir=dataset_cache)
    except Exception as e:
        raise UsageError(
            f"could not load GLUE task {task!r} from the Hugging Face Hub ({type(e).__name__}; offline?); "
            "connect to the network or pass local files with --train-file/--validation-file"
        ) from None
    train, val = raw["train"], raw[info.validation_split]
    train = train.rename_column("label", "labels")
    val = val.rename_column("label", "labels")
    names = getattr(train.features["labels"], "names", None)
    return train, val, cols, info.num_labels, names


def _check_cells(frames, cols: Sequence[str], label_column: str, header: bool) -> None:
    """Columns, texts and labels of each ``(frame, path, flag)``, each problem named by file and row."""
    for df, path, _ in frames:
        _check_columns(list(df.columns), cols, path, "--text-columns", header)
        _check_columns(list(df.columns), [label_column], path, "--label-column", header)
    for df, path, flag in frames:
        for c in cols:
            _check_no_null_texts(df[c].tolist(), c, path, flag)
    for df, path, flag in frames:
        _check_labels(df[label_column].tolist(), label_column, path, flag)


def _load_local(info, train_file, validation_file, cols, label_column: str, header: bool):
    train = _read_frame(train_file, "--train-file", header)
    val = _read_frame(validation_file, "--validation-file", header)
    _check_cells([(train, train_file, "--train-file"), (val, validation_file, "--validation-file")],
                 cols, label_column, header)
    train_labels, val_labels = train[label_column].tolist(), val[label_column].tolist()
    regression = info.num_labels == 1 if info else _is_float_labels(train_labels, label_column, train_file)
    if regression:
        train["labels"] = _float_labels(train_labels, label_column, train_file)
        val["labels"] = _float_labels(val_labels, label_column, validation_file)
        return _to_dataset(train), _to_dataset(val), cols, 1, None
    names, num_labels, ids = _classes(train_labels, info, train_file, label_column)
    unknown = sorted({str(v) for v in val_labels if _label_key(v) not in ids})
    if unknown:
        raise UsageError(
            f"--validation-file {validation_file!r} has labels not seen in --train-file: {', '.join(unknown[:5])}"
        )
    train["labels"] = [ids[_label_key(v)] for v in train_labels]
    val["labels"] = [ids[_label_key(v)] for v in val_labels]
    return _to_dataset(train), _to_dataset(val), cols, num_labels, names


def _label_key(v) -> str:
    """The text form labels are compared by, the same in both files: a csv column holding a word
    reads 1 as "1", a numeric one as 1. 1.0 stays 1, as when labels were compared as numbers; a
    name's surrounding spaces do not make another class ("pos " is "pos")."""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()


def _classes(labels, info, train_file, label_column: str):
    """``(names, num_labels, class id by label key)``: non-negative integer labels are their own
    ids; any other labels are numbered in sorted order."""
    by_key: Dict[str, object] = {}
    for v in sorted(set(labels), key=lambda v: (str(type(v)), v)):
        by_key.setdefault(_label_key(v), v)
    values = list(by_key.values())
    if len(values) < 2:
        raise UsageError(f"--train-file {train_file!r}: column {label_column!r} has a single label value "
                         f"({values[0]!r}); need >= 2 classes")
    if all(isinstance(v, int) for v in values) and min(values) >= 0:
        if max(values) >= 2 * len(values) + 8:  # a head of max + 1 classes, most of them never seen
            raise UsageError(f"--train-file {train_file!r}: column {label_column!r} has {len(values)} classes but a "
                             f"class id of {max(values)}, which would make a head of {max(values) + 1} classes; "
                             "number the classes 0 to k-1 (or give them as names)")
        return None, max(max(values) + 1, info.num_labels if info else 2), {_label_key(v): v for v in values}
    names = list(by_key)  # in the values' order, one per key
    return names, len(names), {k: i for i, k in enumerate(names)}


def _missing(v) -> bool:
    """An absent cell (None or NaN): a jsonl ``null`` or missing key, or a csv row cut short."""
    return v is None or (isinstance(v, float) and v != v)


def _check_no_null_texts(values, column: str, path, flag: str) -> None:
    """A null text is an error naming its file and row: it would otherwise be trained as "None"."""
    for i, v in enumerate(values):
        if _missing(v):
            raise UsageError(f"{flag} {str(path)!r}: column {column!r} is null or missing in data row "
                             f"{i + 1}; every example needs a text")


def _check_labels(values, column: str, path, flag: str) -> None:
    """Each label is a class name, class id or number, else an error naming its file, row and value:
    a blank cell would become a class of its own (or a NaN target), and a jsonl null, true/false,
    list or object would fail deep in the loss."""
    json_file = Path(path).suffix.lower() in (".jsonl", ".json")
    for i, v in enumerate(values):
        if isinstance(v, (bool, list, dict)) or (json_file and _missing(v)):
            shown = json.dumps(None if _missing(v) else v)
            raise UsageError(f"{flag} {str(path)!r}: column {column!r} is {shown} in data row {i + 1}; "
                             "a label must be a class name, a class id or a number")
        if _missing(v) or (isinstance(v, str) and not v.strip()):
            raise UsageError(f"{flag} {str(path)!r}: column {column!r} is blank in data row {i + 1}; "
                             "every example needs a label")


def _is_float_labels(values, column: str, path) -> bool:
    """Regression targets: non-integer numbers. A few among labels that are mostly class ids is a
    data error, not a regression task."""
    fractional = [i for i, v in enumerate(values) if isinstance(v, float) and not float(v).is_integer()]
    if not fractional:
        return False
    if 2 * len(fractional) < len(values):
        i = fractional[0]
        raise UsageError(f"--train-file {str(path)!r}: column {column!r} holds class ids but {len(fractional)} "
                         f"non-integer value(s) (data row {i + 1}: {values[i]!r}); fix those rows, or pass --task stsb "
                         "for a regression target")
    return True


def _float_labels(values, column, path):
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"{str(path)!r}: column {column!r} must hold numbers for a regression task") from None


def tokenize_classification(ds, tokenizer, text_columns: Sequence[str], max_length: int):
    """Token ids (no padding: the collator pads per batch) and the ``labels`` column only."""
    keep = {"labels"}

    def tok(batch):
        texts = [[str(t) for t in batch[c]] for c in text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    return ds.map(tok, batched=True, remove_columns=[c for c in ds.column_names if c not in keep])


def load_text_corpus(
    dataset: Optional[str],
    dataset_config: Optional[str],
    train_files: Sequence[str],
    validation_files: Sequence[str],
    text_column: str,
    validation_fraction: float,
) -> Tuple[List[str], List[str]]:
    """Texts for language modelling: local ``.txt`` (one document per line; blank lines skipped) or
    ``.jsonl`` files (``text_column``), or a Hub dataset. Without validation data the last
    ``validation_fraction`` of the documents is held out."""
    if train_files:
        train = _read_texts(train_files, text_column, "--train-file")
        val = _read_texts(validation_files, text_column, "--validation-file") if validation_files else None
    elif dataset:
        try:
            from datasets import load_dataset

            raw = load_dataset(dataset, dataset_config)
        except Exception as e:
            raise UsageError(
                f"could not load dataset {dataset!r} ({type(e).__name__}: {_first_line(e)}); "
                "check the name, connect to the network, or pass local .txt/.jsonl files with --train-file"
            ) from None
        if "train" not in raw:
            raise UsageError(f"dataset {dataset!r} has no 'train' split (splits: {', '.join(raw)})")
        for split in ("train", "validation"):
            if split in raw and text_column not in raw[split].column_names:
                raise UsageError(
                    f"dataset {dataset!r} has no column {text_column!r} (columns: {', '.join(raw[split].column_names)}); set --text-column"
                )
        train = [t for t in raw["train"][text_column] if t and t.strip()]
        val = [t for t in raw["validation"][text_column] if t and t.strip()] if "validation" in raw else None
    else:
        raise UsageError("give a text corpus: --dataset NAME or local files with --train-file")
    if not train:
        raise UsageError("the training corpus holds no text")
    if val is None:
        n_val = max(1, int(round(len(train) * validation_fraction)))
        if len(train) < 2:
            raise UsageError("the training corpus needs at least 2 documents to hold one out; pass --validation-file")
        train, val = train[:-n_val], train[-n_val:]
    return train, val


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else ""


def _read_texts(files: Sequence[str], text_column: str, flag: str) -> List[str]:
    texts: List[str] = []
    for f in files:
        p = _check_file(f, flag)
        suffix = p.suffix.lower()
        try:
            if suffix == ".txt":
                texts += [line.rstrip("\n") for line in open(p, encoding="utf-8") if line.strip()]
            elif suffix in (".jsonl", ".json"):
                with open(p, encoding="utf-8-sig") as fh:
                    for i, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            raise UsageError(f"{flag} {f!r} line {i} is not valid JSON") from None
                        if not isinstance(rec, dict) or text_column not in rec:
                            raise UsageError(f"{flag} {f!r} line {i} has no {text_column!r} field; set --text-column")
                        if rec[text_column] is None:  # str() would train it as the word "None"
                            raise UsageError(f"{flag} {f!r} line {i}: field {text_column!r} is null; "
                                             "every document needs a text")
                        if str(rec[text_column]).strip():
                            texts.append(str(rec[text_column]))
            else:
                raise UsageError(f"{flag} {f!r}: unknown format {suffix!r}; use .txt or .jsonl files")
        except UnicodeDecodeError:
            raise UsageError(f"{flag} {f!r} is not UTF-8 text") from None
    return texts


def pack_blocks(texts: Sequence[str], tokenizer, block_size: int, what: str = "corpus"):
    """Tokenize, join documents with the EOS (or SEP) token and cut into ``block_size`` blocks;
    the remainder is dropped. Returns a ``datasets.Dataset`` with ``input_ids`` and ``labels``."""
    from datasets import Dataset

    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: List[int] = []
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for doc in enc:
        ids.extend(doc)
        if sep is not None:
            ids.append(sep)
    n = len(ids) // block_size
    if n == 0:
        raise UsageError(
            f"the {what} has {len(ids)} tokens, fewer than one block of --block-size {block_size}; "
            "give more text or a smaller --block-size"
        )
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})
