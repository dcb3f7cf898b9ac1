"""Tests of the trainer's data layer: reading every format, column checks, cleaning, capping and splitting.

Run: `.venv/bin/pytest tests/unit/trainer/test_data.py -q`. No model is needed; files are written to tmp_path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from finetune.spec import Cleaning, FineTuneJobSpec, SpecError
from finetune.trainer.cleaning import clean
from finetune.trainer.data import DataError, prepare_data, read_table

SST2 = Path(__file__).resolve().parents[3] / "data" / "sst2" / "train.tsv"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_spec(train: Path | str, **overrides: Any) -> FineTuneJobSpec:
    """A classification spec reading `train`; keyword arguments (camelCase) are merged in deeply."""
    base: dict[str, Any] = {
        "task": "text-classification",
        "model": {"name": "tiny"},
        "dataset": {"train": {"path": str(train)}},
    }
    return FineTuneJobSpec.model_validate(_merge(base, overrides))


def write(path: Path, frame: pd.DataFrame) -> Path:
    """Write `frame` in the format named by the file's extension."""
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def labelled(n: int, labels: list[Any], **extra: list[Any]) -> pd.DataFrame:
    """n rows of distinct text cycling through `labels`."""
    data: dict[str, list[Any]] = {"text": [f"sentence number {i}" for i in range(n)]}
    data["label"] = [labels[i % len(labels)] for i in range(n)]
    data.update(extra)
    return pd.DataFrame(data)


# --- formats -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_format_loads_with_normalized_columns(tmp_path: Path, suffix: str) -> None:
    frame = labelled(40, ["neg", "pos"]).rename(columns={"text": "sentence", "label": "y"})
    path = write(tmp_path / f"train{suffix}", frame)
    spec = make_spec(path, dataset={"textColumn": "sentence", "labelColumn": "y"})
    data = prepare_data(spec)
    assert data.label_names == ["neg", "pos"]
    for split in (data.train, data.validation, data.test):
        assert list(split.columns) == ["text", "label"]
        assert split["label"].dtype == "int64"
        assert all(isinstance(t, str) for t in split["text"])
    assert data.report["rows_read"] == {"train": 40}
    assert data.report["split"] == {"train": 32, "validation": 4, "test": 4}
    all_text = set(data.train["text"]) | set(data.validation["text"]) | set(data.test["text"])
    assert all_text == set(frame["sentence"])


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", labelled(20, [0, 1]))
    renamed = path.rename(tmp_path / "train.data")
    with pytest.raises(SpecError, match="cannot infer the format"):
        prepare_data(make_spec(renamed))
    assert prepare_data(make_spec(renamed, dataset={"format": "tsv"})).report["rows_read"]["train"] == 20


def test_tsv_with_quote_characters_loads_intact(tmp_path: Path) -> None:
    real = pd.read_csv(SST2, sep="\t", quoting=3, nrows=200)
    sentences = [s.strip() for s in real["sentence"]]
    # A leading or unbalanced double quote makes a quoting parser merge lines; SST-2-style data has them.
    sentences[0] = '"' + sentences[0]
    sentences[1] = sentences[1] + ' "'
    sentences[2] = 'he said " no " and left'
    sentences[3] = '"quoted whole"'
    lines = ["sentence\tlabel"] + [f"{s}\t{lab}" for s, lab in zip(sentences, real["label"], strict=True)]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    frame = read_table(str(path), "tsv")
    assert len(frame) == 200
    assert list(frame["sentence"]) == sentences
    assert any("'" in s for s in frame["sentence"])  # real SST-2 apostrophes survive too


def test_null_and_na_words_stay_text(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", pd.DataFrame({"text": ["null", "NA", "n/a", "fine"] * 5,
                                                       "label": [0, 1] * 10}))
    data = prepare_data(make_spec(path))
    assert {"null", "NA", "n/a"} <= set(pd.concat([data.train, data.validation, data.test])["text"])


# --- labels ----------------------------------------------------------------------------------------------


def test_int_labels_sort_numerically_and_map_to_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", labelled(60, [10, 2, 0]))
    data = prepare_data(make_spec(path))
    assert data.label_names == ["0", "2", "10"]
    train = pd.read_csv(path)
    by_text = dict(zip(train["text"], train["label"], strict=True))
    for _, row in data.train.iterrows():
        assert data.label_names[row["label"]] == str(by_text[row["text"]])


def test_float_and_string_digit_labels_become_integral_names(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", labelled(20, [1.0, 0.0]))
    assert prepare_data(make_spec(path)).label_names == ["0", "1"]
    path = write(tmp_path / "train2.jsonl", labelled(20, ["1", "0"]))
    assert prepare_data(make_spec(path)).label_names == ["0", "1"]


def test_sst2_labels_stay_zero_one(tmp_path: Path) -> None:
    data = prepare_data(make_spec(SST2, dataset={"textColumn": "sentence", "maxSamples": 300}))
    assert data.label_names == ["0", "1"]
    assert sum(data.report["split"].values()) == 300


def test_string_labels_and_counts_in_report(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", labelled(30, ["pos", "neg", "neutral"]))
    data = prepare_data(make_spec(path))
    assert data.label_names == ["neg", "neutral", "pos"]
    counts = data.report["label_counts"]
    assert sum(counts["train"].values()) == len(data.train)
    assert {k: sum(v[k] for v in counts.values()) for k in data.label_names} == {
        "neg": 10, "neutral": 10, "pos": 10}


def test_group_column(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", labelled(20, [0, 1], dialect=["a", "b", "c", "d"] * 5))
    data = prepare_data(make_spec(path, evaluation={"groupColumn": "dialect"}))
    assert list(data.train.columns) == ["text", "label", "group"]
    assert set(pd.concat([data.train, data.test])["group"]) <= {"a", "b", "c", "d"}


# --- errors ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset\.train\.path: file .*nope\.tsv does not exist"):
        prepare_data(make_spec(tmp_path / "nope.tsv"))
    ok = write(tmp_path / "train.csv", labelled(20, [0, 1]))
    with pytest.raises(DataError, match=r"dataset\.test\.path: file .*gone\.csv does not exist"):
        prepare_data(make_spec(ok, dataset={"test": {"path": str(tmp_path / "gone.csv")}}))


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", labelled(10, [0, 1]).rename(columns={"text": "sentence"}))
    with pytest.raises(DataError) as err:
        prepare_data(make_spec(path, dataset={"textColumn": "sentence2"}))
    assert str(err.value) == (
        f"dataset.textColumn: column 'sentence2' not found in {path}; columns are: sentence, label"
    )
    with pytest.raises(DataError, match=r"dataset\.labelColumn: column 'y' not found .*train\.tsv"):
        prepare_data(make_spec(path, dataset={"textColumn": "sentence", "labelColumn": "y"}))
    with pytest.raises(DataError, match=r"evaluation\.groupColumn: column 'g' not found"):
        prepare_data(make_spec(path, dataset={"textColumn": "sentence"}, evaluation={"groupColumn": "g"}))


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("train.tsv", "text\tlabel\na\t0\nb\textra\t1\n", r"cannot read .*train\.tsv as tsv: .*Expected 2 fields"),
        ("train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", label: 1}\n',
         r"cannot read .*train\.jsonl as jsonl: line 2 is not valid JSON"),
        ("train.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n', r"cannot read .*line 2 is a JSON list"),
        ("train.parquet", "this is not parquet", r"cannot read .*train\.parquet as parquet: "),
        ("train.csv", "", r"file .*train\.csv is empty"),
        ("train.jsonl", "", r"file .*train\.jsonl is empty"),
        ("train.csv", "text,label\n", r"file .*train\.csv has no data rows \(columns: text, label\)"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"dataset\.train\.path: " + pattern):
        prepare_data(make_spec(path))


def test_not_utf8_names_the_line_and_the_byte_in_it(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfine,0\nalso fine,1\nab\xff bad,0\n")
    with pytest.raises(DataError, match=r"train\.csv is not UTF-8 text: line 4, byte 3 of that line "
                                        r"\(invalid start byte\); save it as UTF-8"):
        prepare_data(make_spec(path))


def test_a_folder_as_data_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset\.train\.path: .* is a folder; point at one data file inside it"):
        prepare_data(make_spec(tmp_path))


def test_swapped_text_and_label_columns_are_refused_with_the_hint(tmp_path: Path) -> None:
    frame = labelled(400, ["pos", "neg"])
    path = write(tmp_path / "train.csv", frame.rename(columns={"text": "label", "label": "text"}))
    with pytest.raises(DataError, match=r"has 400 distinct values in 400 rows.*are dataset\.textColumn \('text'\) "
                                        r"and dataset\.labelColumn swapped\?"):
        prepare_data(make_spec(path))


def test_label_names_that_name_no_label_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", labelled(100, [0, 1]))
    with pytest.raises(DataError, match=r"dataset\.labelNames: 'pos' name no label of column 'label' .*its labels "
                                        r"are: 0, 1"):
        prepare_data(make_spec(path, dataset={"labelNames": {"1": "positive", "pos": "positive"}}))
    assert prepare_data(make_spec(path, dataset={"labelNames": {"1": "positive"}})).label_names == ["0", "1"]


def test_a_tiny_file_cannot_train_every_class(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"classes with fewer than 5 training rows after the validation and test "
                                        r"rows were split off"):
        prepare_data(make_spec(write(tmp_path / "train.csv", labelled(5, ["a", "b"]))))


def test_missing_labels_report_count_and_first_row(tmp_path: Path) -> None:
    frame = labelled(10, ["a", "b"])
    frame.loc[[3, 7], "label"] = ""
    path = write(tmp_path / "train.csv", frame)
    with pytest.raises(DataError, match=r"column 'label' in .*train\.csv has 2 rows .*first at data row 4"):
        prepare_data(make_spec(path))
    frame = labelled(10, [0, 1])
    frame["label"] = frame["label"].astype(object)
    frame.loc[5, "label"] = None
    path = write(tmp_path / "train.jsonl", frame)
    with pytest.raises(DataError, match=r"has 1 rows .*first at data row 6"):
        prepare_data(make_spec(path))


def test_single_class_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", labelled(10, ["pos"]))
    with pytest.raises(DataError, match=r"column 'label' in .*train\.csv has only 1 distinct label \(pos\)"):
        prepare_data(make_spec(path))


def test_unseen_labels_in_test_file(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", labelled(20, ["neg", "pos"]))
    test = write(tmp_path / "test.csv", labelled(6, ["neg", "maybe", "pos"]))
    with pytest.raises(DataError, match=r"dataset\.test\.path: labels 'maybe' in .*test\.csv .*neg, pos"):
        prepare_data(make_spec(train, dataset={"test": {"path": str(test)}}))


@pytest.mark.parametrize("which", ["test", "validation"])
def test_zero_fraction_without_file_is_rejected(tmp_path: Path, which: str) -> None:
    path = write(tmp_path / "train.csv", labelled(20, [0, 1]))
    with pytest.raises(DataError, match=rf"set dataset\.{which}\.path or dataset\.split\.{which}Fraction"):
        prepare_data(make_spec(path, dataset={"split": {f"{which}Fraction": 0.0}}))


def test_zero_fraction_with_file_is_fine(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", labelled(20, [0, 1]))
    test = write(tmp_path / "test.csv", labelled(8, [0, 1]))
    data = prepare_data(make_spec(train, dataset={"test": {"path": str(test)}, "split": {"testFraction": 0}}))
    assert data.report["split"] == {"train": 18, "validation": 2, "test": 8}
    assert data.report["rows_read"] == {"train": 20, "test": 8}


def test_everything_removed_by_cleaning(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", pd.DataFrame({"text": ["   ", "\t"], "label": [0, 1]}))
    with pytest.raises(DataError, match=r"no rows of .*train\.csv are left after cleaning"):
        prepare_data(make_spec(path))


def test_too_few_rows_to_split(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", labelled(2, [0, 1]))
    with pytest.raises(DataError, match=r"dataset\.split: cannot split .* training rows off as validation"):
        prepare_data(make_spec(path))


# --- cleaning ----------------------------------------------------------------------------------------------


def test_cleaning_steps_rewrite_and_count() -> None:
    frame = pd.DataFrame({
        "text": [
            "see https://example.com/a?b=1 now",
            "<p>Tom &amp; Jerry</p><script>var x = 1;</script>",
            "  lots   of \n space ",
            "www.only-a-link.org",
            "<br/>",
            "dup",
            "dup",
            "dup",
        ],
        "label": [0, 0, 0, 0, 0, 0, 0, 1],
    })
    everything = Cleaning(strip_urls=True, strip_html=True, normalize_whitespace=True, drop_empty=True,
                          drop_duplicates=True)
    out, removed, changed = clean(frame, everything, ["text"], ["text", "label"])
    assert list(out["text"]) == ["see now", "Tom & Jerry", "lots of space", "dup", "dup"]
    assert list(out["label"]) == [0, 0, 0, 0, 1]
    assert removed == {"strip_urls": 0, "strip_html": 0, "normalize_whitespace": 0, "drop_empty": 2,
                       "drop_duplicates": 1}
    assert changed == {"strip_urls": 2, "strip_html": 2, "normalize_whitespace": 4}


def test_cleaning_off_changes_nothing() -> None:
    frame = pd.DataFrame({"text": [" a ", "", " a "]})
    off = Cleaning(normalize_whitespace=False, drop_empty=False)
    out, removed, changed = clean(frame, off, ["text"])
    assert list(out["text"]) == [" a ", "", " a "]
    assert removed == {} and changed == {}


def test_cleaning_counts_reach_the_report_and_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frame = labelled(30, [0, 1])
    frame.loc[0, "text"] = "   "
    frame.loc[1, "text"] = frame.loc[3, "text"]  # same text and label (both odd rows) -> a duplicate
    frame.loc[2, "text"] = frame.loc[5, "text"]  # same text, other label -> kept
    path = write(tmp_path / "train.csv", frame)
    caplog.set_level(logging.INFO, logger="finetune.trainer.data")
    data = prepare_data(make_spec(path, dataset={"cleaning": {"dropDuplicates": True}}))
    assert data.report["cleaning"]["train"] == {"normalize_whitespace": 0, "drop_empty": 1, "drop_duplicates": 1}
    assert sum(data.report["split"].values()) == 28
    assert "train: cleaning step drop_empty removed 1 rows" in caplog.text
    assert "train: cleaning step drop_duplicates removed 1 rows" in caplog.text


# --- capping and splitting ------------------------------------------------------------------------------


def test_stratified_split_keeps_ratios_and_is_deterministic(tmp_path: Path) -> None:
    path = write(tmp_path / "train.parquet", labelled(1000, [0, 0, 0, 1]))  # 75% / 25%
    spec = make_spec(path, dataset={"split": {"validationFraction": 0.2, "testFraction": 0.1, "seed": 7}})
    data = prepare_data(spec)
    assert data.report["split"] == {"train": 700, "validation": 200, "test": 100}
    assert data.report["split_from_train"] == {"test": True, "validation": True}
    for split in (data.train, data.validation, data.test):
        assert split["label"].mean() == pytest.approx(0.25, abs=0.01)
    again = prepare_data(spec)
    for a, b in ((data.train, again.train), (data.validation, again.validation), (data.test, again.test)):
        pd.testing.assert_frame_equal(a, b)
    other = prepare_data(make_spec(path, dataset={"split": {"validationFraction": 0.2, "testFraction": 0.1,
                                                            "seed": 8}}))
    assert set(other.test["text"]) != set(data.test["text"])
    assert not set(data.train["text"]) & (set(data.validation["text"]) | set(data.test["text"]))


def test_more_classes_than_test_rows_falls_back_to_random_split(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "train.csv", labelled(40 * 12, list(range(40))))
    data = prepare_data(make_spec(path, dataset={"split": {"testFraction": 0.05}}))  # 24 test rows, 40 classes
    assert "cannot stratify by label" in caplog.text
    assert len(data.label_names or []) == 40
    assert sum(data.report["split"].values()) == 480
    assert data.report["split_from_train"]["test"] is False


def test_a_class_too_rare_to_learn_is_refused(tmp_path: Path) -> None:
    """A class with one row would vanish into the test split, or train from nothing; exit 2 names it."""
    frame = labelled(50, [0, 1])
    frame.loc[0, "label"] = 2
    with pytest.raises(DataError, match=r"classes with fewer than 5 training rows .*: '2' \(\d\)"):
        prepare_data(make_spec(write(tmp_path / "train.csv", frame)))


def test_max_samples_caps_before_split_deterministically(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", labelled(500, ["a", "b"]))
    spec = make_spec(path, dataset={"maxSamples": 100})
    data = prepare_data(spec)
    assert data.report["split"] == {"train": 80, "validation": 10, "test": 10}
    assert data.report["max_samples"] == {"before": 500, "after": 100}
    texts = set(data.train["text"]) | set(data.validation["text"]) | set(data.test["text"])
    assert len(texts) == 100 and texts <= set(pd.read_csv(path)["text"])
    assert set(prepare_data(spec).train["text"]) == set(data.train["text"])
    # a file with fewer rows than the cap is used whole
    assert "max_samples" not in prepare_data(make_spec(path, dataset={"maxSamples": 1000})).report


# --- causal-lm ------------------------------------------------------------------------------------------


def causal(train: Path, **dataset: Any) -> FineTuneJobSpec:
    return make_spec(train, task="causal-lm", dataset=dataset)


def test_causal_prompt_completion(tmp_path: Path) -> None:
    frame = pd.DataFrame({"q": [f"question {i}" for i in range(20)], "a": [f"answer {i}" for i in range(20)]})
    frame.loc[0, "a"] = ""
    path = write(tmp_path / "train.jsonl", frame)
    data = prepare_data(causal(path, promptColumn="q", completionColumn="a"))
    assert data.label_names is None
    assert list(data.train.columns) == ["prompt", "completion"]
    assert data.report["cleaning"]["train"]["drop_empty"] == 1
    assert sum(data.report["split"].values()) == 19
    row = data.test.iloc[0]
    assert row["prompt"].split()[-1] == row["completion"].split()[-1]
    with pytest.raises(DataError, match=r"dataset\.completionColumn: column 'answer' not found"):
        prepare_data(causal(path, promptColumn="q", completionColumn="answer"))


def test_causal_messages_from_json_strings_and_lists(tmp_path: Path) -> None:
    chats = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]
             for i in range(20)]
    as_text = write(tmp_path / "train.csv", pd.DataFrame({"chat": [json.dumps(c) for c in chats]}))
    as_lists = write(tmp_path / "train.jsonl", pd.DataFrame({"chat": chats}))
    as_parquet = write(tmp_path / "train.parquet", pd.DataFrame({"chat": chats}))
    for path in (as_text, as_lists, as_parquet):
        data = prepare_data(causal(path, messagesColumn="chat"))
        assert list(data.train.columns) == ["messages"]
        got = list(data.train["messages"]) + list(data.validation["messages"]) + list(data.test["messages"])
        assert sorted(got, key=json.dumps) == sorted(chats, key=json.dumps)


def test_causal_messages_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", pd.DataFrame({"chat": ['[{"role": "user", "content": "x"}]', "[oops"]}))
    with pytest.raises(DataError, match=r"dataset\.messagesColumn: column 'chat' in .*train\.csv, data row 2: "
                                        r"not valid JSON"):
        prepare_data(causal(path, messagesColumn="chat"))
    path = write(tmp_path / "train.jsonl", pd.DataFrame({"chat": [[{"role": "user"}]]}))
    with pytest.raises(DataError, match=r"data row 1: each turn needs string 'role' and 'content'"):
        prepare_data(causal(path, messagesColumn="chat"))


def test_causal_plain_text(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.tsv", pd.DataFrame({"body": [f"line {i}  of text" for i in range(30)]}))
    data = prepare_data(causal(path, textColumn="body"))
    assert list(data.train.columns) == ["text"]
    assert data.report["split"] == {"train": 24, "validation": 3, "test": 3}
    texts = set(data.train["text"]) | set(data.validation["text"]) | set(data.test["text"])
    assert "line 0  of text" in texts, "causal-lm text is learned as written: no white-space rewriting by default"
    asked = prepare_data(causal(path, textColumn="body", cleaning={"normalizeWhitespace": True}))
    assert "line 0 of text" in set(asked.train["text"]) | set(asked.validation["text"]) | set(asked.test["text"])


def test_causal_prompts_and_completions_are_not_rewritten_by_default(tmp_path: Path) -> None:
    """The prompt template's newline and the completion's leading space are part of what is learned."""
    rows = pd.DataFrame({"q": [f"Question: what is {i}?\nAnswer:" for i in range(40)],
                         "a": [f" it is {i}" for i in range(40)]})
    data = prepare_data(causal(write(tmp_path / "qa.jsonl", rows), promptColumn="q", completionColumn="a"))
    assert all(p.endswith("?\nAnswer:") for p in data.train["prompt"])
    assert all(c.startswith(" it is") for c in data.train["completion"])
    assert "normalize_whitespace" not in data.report["cleaning_steps"]
    assert data.report["cleaning_rows_changed"]["train"] == {}
    classify = prepare_data(make_spec(write(tmp_path / "c.csv", labelled(40, ["a", "b"]))))
    assert "normalize_whitespace" in classify.report["cleaning_steps"], "classification keeps its default"


def test_a_test_split_of_one_class_is_refused(tmp_path: Path) -> None:
    """A model that always answers the one class would score 1.0 on it and pass any gate."""
    train = write(tmp_path / "train.csv", labelled(300, ["k0", "k1", "k2"]))
    test = write(tmp_path / "test.csv", labelled(40, ["k0"]))
    with pytest.raises(DataError, match=r"dataset\.test: the test rows from .*test\.csv hold only class 'k0' of 3; "
                                        r"its metrics would say nothing about the others"):
        prepare_data(make_spec(train, dataset={"test": {"path": str(test)}}))


def test_true_false_labels_keep_their_words_and_yaml_keys_of_any_type_name_them(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'True' if i % 2 else 'False'}\n" for i in range(60)))
    spec = make_spec(path, dataset={"labelNames": {True: "positive", False: "negative"}})
    assert prepare_data(spec).label_names == ["False", "True"]
    numbered = write(tmp_path / "n.csv", labelled(60, [0, 1]))
    assert make_spec(numbered, dataset={"labelNames": {0: "negative"}}).dataset.label_names == {"0": "negative"}


def test_a_continuous_label_column_is_called_what_it_is(tmp_path: Path) -> None:
    frame = labelled(400, [0])
    frame["label"] = [i / 7 for i in range(400)]
    with pytest.raises(DataError, match=r"400 distinct numbers in 400 rows, which looks like a continuous value"):
        prepare_data(make_spec(write(tmp_path / "train.csv", frame)))
