"""Data preparation: read the job's files, check their columns, clean, cap, split and encode labels.

`prepare_data(spec)` is the one entry point the trainer calls; it returns three frames with normalized
column names, whatever the user's files call them:

- text-classification: `text` (str), `label` (int id into `label_names`), `group` (str, when
  `evaluation.groupColumn` is set);
- causal-lm: `prompt` + `completion` (dataset.promptColumn), `messages` (list of {role, content};
  dataset.messagesColumn), or `text` (continued pre-training).

Every problem with the data is a `DataError` (a `SpecError`: the trainer exits 2 and the operator does not
retry) whose message names the spec field, the file, the column and what was found.

Try it: `python -c "from finetune.spec import load_job; from finetune.trainer.data import prepare_data;
print(prepare_data(load_job('job.yaml').spec).report)"`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from finetune.spec import DataFormat, FineTuneJobSpec, SpecError
from finetune.trainer.cleaning import clean

log = logging.getLogger("finetune.trainer.data")

SPLITS = ("train", "validation", "test")


class DataError(SpecError):
    """The data cannot be used as the spec describes; the message names the file, the column and the problem."""


@dataclass
class PreparedData:
    """The three splits with normalized columns, plus what happened to the data on the way.

    `report` keys: files, rows_read (per file read), cleaning_steps (the steps that ran), cleaning (rows
    removed per step, per file),
    cleaning_rows_changed (rows rewritten per text step), max_samples (before/after, when it capped),
    split_from_train ({split: stratified?} for the splits cut from train), split (final sizes),
    label_names and label_counts ({split: {label name: rows}}) for classification.
    """

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: list[str] | None  # classification: sorted label names; a label id indexes this list
    report: dict[str, Any]  # rows read, rows removed per cleaning step, split sizes, label counts


def check_file(path: str, field: str) -> Path:
    """The data file, or a DataError saying why it cannot be one (before its format is looked at)."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"{field}: file {path} does not exist")
    if file.is_dir():
        raise DataError(f"{field}: {path} is a folder; point at one data file inside it (csv, tsv, jsonl, parquet)")
    if not file.is_file():
        raise DataError(f"{field}: {path} is not a regular file")
    return file


def first_bad_utf8(file: Path) -> tuple[int, int, str]:
    """Line, byte within that line (both from 1) and reason of the first byte that is not UTF-8."""
    with file.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return number, err.start + 1, err.reason
    return 0, 0, "unknown"


def read_table(path: str, fmt: DataFormat, field: str = "dataset.train.path") -> pd.DataFrame:
    """Read one data file into a frame; any failure is a DataError naming `field` and the file."""
    file = check_file(path, field)
    try:
        if fmt in ("csv", "tsv"):
            # TSV is read with quoting off: SST-2-style sentences contain stray quote characters that
            # a quoting parser would treat as field delimiters. keep_default_na=False keeps words such
            # as "null" or "NA" as text instead of turning them into missing values.
            frame = pd.read_csv(
                file,
                sep="\t" if fmt == "tsv" else ",",
                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
                keep_default_na=False,
                low_memory=False,
            )
        elif fmt == "jsonl":
            frame = _read_jsonl(file)
        else:
            frame = pd.read_parquet(file)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{field}: file {path} is empty (no header, no rows)") from None
    except UnicodeDecodeError:
        # The decoder's position is within one of pandas' read buffers; find the line for the message.
        line, column, reason = first_bad_utf8(file)
        raise DataError(f"{field}: file {path} is not UTF-8 text: line {line}, byte {column} of that line "
                        f"({reason}); save it as UTF-8") from None
    except Exception as err:  # each parser raises its own types; the message is what the user needs
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{field}: cannot read {path} as {fmt}: {msg}") from None
    if len(frame) == 0:
        raise DataError(f"{field}: file {path} has no data rows (columns: {_columns(frame)})")
    return frame


def _read_jsonl(file: Path) -> pd.DataFrame:
    """JSON Lines via pandas' fast reader; on a parse error, find the bad line for the message."""
    if file.stat().st_size == 0:
        raise pd.errors.EmptyDataError("empty")
    try:
        # dtype/convert_dates off: keep the values as JSON typed them (no "2020-01-01" -> Timestamp).
        return pd.read_json(file, lines=True, dtype=False, convert_dates=False)
    except (ValueError, TypeError):
        pass
    with file.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number} is not valid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(value, dict):
                raise ValueError(f"line {number} is a JSON {type(value).__name__}, expected an object")
    raise ValueError("not valid JSON Lines (one JSON object per line)")


def _columns(frame: pd.DataFrame) -> str:
    return ", ".join(str(c) for c in frame.columns)


def _column(frame: pd.DataFrame, column: str, field: str, path: str) -> pd.Series:
    if column not in frame.columns:
        raise DataError(f"{field}: column {column!r} not found in {path}; columns are: {_columns(frame)}")
    return frame[column]


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _to_text(s: pd.Series) -> pd.Series:
    """Any column as str; missing values become "" so drop_empty can remove them."""
    return s.map(lambda v: "" if _missing(v) else str(v)).astype(str)


def _label_strings(s: pd.Series, field: str, path: str) -> pd.Series:
    """Labels as canonical strings: an integral number (1, 1.0, "1") is "1"; text is stripped."""
    missing = s.map(_missing).astype(bool)
    if missing.any():
        first = int(np.flatnonzero(missing.to_numpy())[0]) + 1
        raise DataError(
            f"{field}: column {s.name!r} in {path} has {int(missing.sum())} rows with an empty or missing "
            f"label (first at data row {first}); fill them in or remove those rows"
        )
    if pd.api.types.is_bool_dtype(s):  # pandas reads True/False columns as bools: keep their words
        return s.map(str).astype(str)
    numbers = pd.to_numeric(s, errors="coerce")
    if numbers.notna().all():
        return numbers.map(lambda v: str(int(v)) if float(v).is_integer() else str(v)).astype(str)
    return s.map(lambda v: str(v).strip()).astype(str)


def _sort_names(names: set[str]) -> list[str]:
    """Numeric labels sort by value (2 before 10); text labels alphabetically."""
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def _messages(s: pd.Series, field: str, path: str) -> pd.Series:
    """Chat turns as a list of {role, content} dicts; a JSON string holding that list is accepted too."""

    def parse(row: int, value: Any) -> list[dict[str, str]]:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else []
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{field}: column {s.name!r} in {path}, data row {row}: not valid JSON ({err.msg})"
                ) from None
        if isinstance(value, np.ndarray):  # parquet hands list columns back as arrays
            value = value.tolist()
        if value is None:
            value = []
        if not isinstance(value, list):
            raise DataError(
                f"{field}: column {s.name!r} in {path}, data row {row}: expected a list of "
                f"{{role, content}} turns, found {type(value).__name__}"
            )
        turns = []
        for turn in value:
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                    and isinstance(turn.get("content"), str)):
                raise DataError(
                    f"{field}: column {s.name!r} in {path}, data row {row}: each turn needs string "
                    f"'role' and 'content', found {str(turn)[:80]}"
                )
            turns.append({"role": turn["role"], "content": turn["content"]})
        return turns

    return pd.Series([parse(i + 1, v) for i, v in enumerate(s)], index=s.index, dtype=object, name="messages")


def _normalize(frame: pd.DataFrame, spec: FineTuneJobSpec, path: str) -> pd.DataFrame:
    """The user's columns under our names; labels still as canonical strings."""
    d = spec.dataset
    out: dict[str, pd.Series] = {}
    if spec.task == "text-classification":
        out["text"] = _to_text(_column(frame, d.text_column, "dataset.textColumn", path))
        label = _column(frame, d.label_column, "dataset.labelColumn", path)
        out["label"] = _label_strings(label, "dataset.labelColumn", path)
        if spec.evaluation.group_column:
            group = _column(frame, spec.evaluation.group_column, "evaluation.groupColumn", path)
            out["group"] = _to_text(group)
    elif d.prompt_column and d.completion_column:
        out["prompt"] = _to_text(_column(frame, d.prompt_column, "dataset.promptColumn", path))
        out["completion"] = _to_text(_column(frame, d.completion_column, "dataset.completionColumn", path))
    elif d.messages_column:
        out["messages"] = _messages(
            _column(frame, d.messages_column, "dataset.messagesColumn", path), "dataset.messagesColumn", path
        )
    else:
        out["text"] = _to_text(_column(frame, d.text_column, "dataset.textColumn", path))
    return pd.DataFrame(out).reset_index(drop=True)


def _text_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in ("text", "prompt", "completion", "messages") if c in frame.columns]


def _clean(
    frame: pd.DataFrame, spec: FineTuneJobSpec, split: str
) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    text = _text_columns(frame)
    keys = text + (["label"] if "label" in frame.columns else [])
    cleaned, removed, changed = clean(frame, spec.dataset.cleaning.for_task(spec.task), text, keys)
    for step, count in removed.items():
        extra = f", {changed[step]} rows changed" if step in changed else ""
        log.info("%s: cleaning step %s removed %d rows%s", split, step, count, extra)
    return cleaned, removed, changed


def _cap(frame: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset in the original row order, so the same spec always trains on the same rows."""
    if max_samples is None or len(frame) <= max_samples:
        return frame
    return frame.sample(n=max_samples, random_state=seed).sort_index().reset_index(drop=True)


def _split_off(
    frame: pd.DataFrame, fraction: float, seed: int, stratify: bool, name: str
) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """Split `fraction` of the rows off as `name`; stratified by label when the classes allow it."""

    def split(by: pd.Series | None) -> tuple[pd.DataFrame, pd.DataFrame]:
        rest, part = train_test_split(frame, test_size=fraction, random_state=seed, shuffle=True, stratify=by)
        return rest.reset_index(drop=True), part.reset_index(drop=True)

    try:
        if stratify:
            try:
                return (*split(frame["label"]), True)
            except ValueError as err:
                log.warning("%s split: cannot stratify by label (%s); splitting at random instead", name, err)
        return (*split(None), False)
    except ValueError as err:
        raise DataError(
            f"dataset.split: cannot split {fraction:.3g} of {len(frame)} training rows off as {name}: {err}"
        ) from None


MIN_TRAIN_ROWS_PER_CLASS = 5
# A label column with more distinct values than this share of its rows (and more than a few dozen
# classes) holds free text or ids, not classes: most likely the text and label columns are swapped.
MAX_CLASS_SHARE, MIN_SUSPICIOUS_CLASSES = 0.5, 20


def check_label_set(names: list[str], rows: int, spec: FineTuneJobSpec, path: str) -> None:
    """Refuse label columns that cannot mean classes, and labelNames that name no label."""
    d = spec.dataset
    if len(names) < 2:
        raise DataError(
            f"dataset.labelColumn: column {d.label_column!r} in {path} has only {len(names)} distinct label "
            f"({', '.join(names)}); classification needs at least 2"
        )
    if len(names) > MIN_SUSPICIOUS_CLASSES and len(names) > MAX_CLASS_SHARE * rows:
        if all(_is_number(n) for n in names):
            raise DataError(
                f"dataset.labelColumn: column {d.label_column!r} in {path} has {len(names)} distinct numbers in "
                f"{rows} rows, which looks like a continuous value (a score or a rating to regress); "
                "text-classification needs a label with a few classes: bin the values into classes"
            )
        raise DataError(
            f"dataset.labelColumn: column {d.label_column!r} in {path} has {len(names)} distinct values in "
            f"{rows} rows, which is free text or ids rather than classes; are dataset.textColumn "
            f"({d.text_column!r}) and dataset.labelColumn swapped?"
        )
    unknown = sorted(set(d.label_names) - set(names))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10])
        raise DataError(
            f"dataset.labelNames: {shown} name no label of column {d.label_column!r} in {path}; "
            f"its labels are: {', '.join(names[:20])}"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_training_rows_per_class(counts: dict[str, int], path: str, split_from_train: bool) -> None:
    """Every class needs a few training rows, or the model can never learn it (and its test figures lie)."""
    scarce = {name: n for name, n in counts.items() if n < MIN_TRAIN_ROWS_PER_CLASS}
    if not scarce:
        return
    shown = ", ".join(f"{name!r} ({n})" for name, n in list(scarce.items())[:10])
    where = " after the validation and test rows were split off" if split_from_train else ""
    raise DataError(
        f"dataset.labelColumn: classes with fewer than {MIN_TRAIN_ROWS_PER_CLASS} training rows{where} in "
        f"{path}: {shown}; add rows of these classes, or merge or remove them"
    )


def check_evaluation_classes(split: str, counts: dict[str, int], path: str) -> None:
    """A validation or test split of one class makes every figure a statement about that class alone:
    a model that always answers it scores 1.0 and would pass any gate."""
    present = [name for name, n in counts.items() if n]
    if len(present) >= 2:
        return
    only = repr(present[0]) if present else "none"
    raise DataError(
        f"dataset.{split}: the {split} rows from {path} hold only class {only} of {len(counts)}; its metrics "
        f"would say nothing about the others (a model that always answers {only} would score 1.0): give a "
        f"{split} set with at least 2 classes"
    )


def _encode(frame: pd.DataFrame, names: list[str], split: str, path: str) -> pd.DataFrame:
    ids = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(frame["label"]) - ids.keys())
    if unseen:
        shown = ", ".join(repr(u) for u in unseen[:10])
        raise DataError(
            f"dataset.{split}.path: labels {shown} in {path} (column dataset.labelColumn) do not occur "
            f"in the training data, whose labels are: {', '.join(names)}"
        )
    out = frame.copy()
    out["label"] = frame["label"].map(ids).astype("int64")
    return out


def _label_counts(frame: pd.DataFrame, names: list[str]) -> dict[str, int]:
    counts = frame["label"].value_counts()
    return {name: int(counts.get(i, 0)) for i, name in enumerate(names)}


def prepare_data(spec: FineTuneJobSpec) -> PreparedData:
    """Read, check, clean, cap and split the job's data; see the module docstring for the output columns."""
    d = spec.dataset
    files = {name: getattr(d, name) for name in SPLITS}
    classify = spec.task == "text-classification"
    for name, frac in (("validation", d.split.validation_fraction), ("test", d.split.test_fraction)):
        if files[name] is None and frac <= 0:
            raise DataError(
                f"dataset.split.{name}Fraction is 0 and dataset.{name}.path is not set: a {name} set is "
                f"required; set dataset.{name}.path or dataset.split.{name}Fraction (e.g. 0.1)"
            )
    report: dict[str, Any] = {
        "files": {}, "rows_read": {}, "cleaning": {}, "cleaning_rows_changed": {},
        "cleaning_steps": [step for step, on in d.cleaning.for_task(spec.task).model_dump().items() if on],
    }
    frames: dict[str, pd.DataFrame] = {}
    paths: dict[str, str] = {}
    for name, file in files.items():
        if file is None:
            continue
        paths[name] = file.path
        check_file(file.path, f"dataset.{name}.path")
        raw = read_table(file.path, d.format_of(file.path), field=f"dataset.{name}.path")
        report["files"][name] = file.path
        report["rows_read"][name] = len(raw)
        log.info("%s: read %d rows from %s", name, len(raw), file.path)
        frames[name], report["cleaning"][name], report["cleaning_rows_changed"][name] = _clean(
            _normalize(raw, spec, file.path), spec, name
        )
        if len(frames[name]) == 0:
            raise DataError(f"dataset.{name}.path: no rows of {file.path} are left after cleaning")

    train = frames["train"]
    if d.max_samples is not None and len(train) > d.max_samples:
        report["max_samples"] = {"before": len(train), "after": d.max_samples}
        log.info("train: keeping %d of %d rows (dataset.maxSamples)", d.max_samples, len(train))
        train = _cap(train, d.max_samples, d.split.seed)

    label_names: list[str] | None = None
    if classify:
        label_names = _sort_names(set(train["label"]))
        check_label_set(label_names, len(train), spec, paths["train"])
        train = _encode(train, label_names, "train", paths["train"])
        for name in ("validation", "test"):
            if name in frames:
                frames[name] = _encode(frames[name], label_names, name, paths[name])

    # Test first, then validation from the rest, so each fraction is a share of the whole train file.
    stratified: dict[str, bool] = {}
    test_frac, val_frac = d.split.test_fraction, d.split.validation_fraction
    if "test" not in frames:
        train, frames["test"], stratified["test"] = _split_off(train, test_frac, d.split.seed, classify, "test")
    if "validation" not in frames:
        share = val_frac / (1 - test_frac) if "test" not in paths else val_frac
        train, frames["validation"], stratified["validation"] = _split_off(
            train, share, d.split.seed, classify, "validation"
        )
    frames["train"] = train
    report["split_from_train"] = stratified
    report["split"] = {name: len(frames[name]) for name in SPLITS}
    log.info("split sizes: %s", report["split"])
    if label_names is not None:
        report["label_names"] = label_names
        report["label_counts"] = {name: _label_counts(frames[name], label_names) for name in SPLITS}
        check_training_rows_per_class(report["label_counts"]["train"], paths["train"], bool(stratified))
        for name in ("validation", "test"):
            check_evaluation_classes(name, report["label_counts"][name], paths.get(name, paths["train"]))
    return PreparedData(frames["train"], frames["validation"], frames["test"], label_names, report)
