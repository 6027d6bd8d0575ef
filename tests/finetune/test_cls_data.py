"""Classification data and metrics: file formats, bad input, stratified splits, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptjax.errors import GptjaxError
from gptjax.finetune.cls_data import balance, read_labeled, stratified_split
from gptjax.finetune.cls_metrics import classification_report, confusion_matrix, format_report, plot_confusion

SMS_LIKE = (
    'ham\tOk lar... Joking wif u oni...\n'
    'spam\tFree entry! Text "WIN to 87121\n'          # an unbalanced quote, as in the real file
    'ham\tHe said "see you" and left \n'             # trailing space is part of the text
    'spam\tURGENT! You have won a 1 week FREE membership\n'
)


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(GptjaxError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- reading -------------------------------------------------------------------------------

def test_tsv_without_header_by_column_numbers_ignores_quotes(tmp_path):
    path = write(tmp_path, "sms.tsv", SMS_LIKE)
    data = read_labeled(path, text_column="1", label_column="0")
    assert data.classes == ("ham", "spam")
    assert data.labels.dtype == np.int32
    assert data.labels.tolist() == [0, 1, 0, 1]
    assert data.texts[1] == 'Free entry! Text "WIN to 87121'
    assert data.texts[2] == 'He said "see you" and left '


def test_tsv_header_by_name_crlf_and_bom(tmp_path):
    path = write(tmp_path, "d.tab", "\ufeffid\tlabel\ttext\r\n1\tb\tfirst\r\n2\ta\tsecond\r\n\r\n")
    data = read_labeled(path)
    assert data.classes == ("a", "b")
    assert data.texts == ["first", "second"]
    assert data.labels.tolist() == [1, 0]


def test_headerless_file_read_by_name_gets_a_hint(tmp_path):
    path = write(tmp_path, "sms.tsv", SMS_LIKE)
    message = error_of(read_labeled, path)
    assert "has no column 'text'; its header is: ham, Ok lar... Joking wif u oni..." in message
    assert "--label-column 0 --text-column 1" in message


def test_misspelt_column_in_a_real_header_has_no_hint(tmp_path):
    path = write(tmp_path, "d.csv", "id,category,body\n1,x,hello\n")
    message = error_of(read_labeled, path, label_column="category")
    assert message.endswith("has no column 'text'; its header is: id, category, body")


def test_csv_quoted_fields_numeric_labels_sort_as_strings(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\n"hello, world",10\n"multi\nline",2\nplain,10\n')
    data = read_labeled(path)
    assert data.texts == ["hello, world", "multi\nline", "plain"]
    assert data.classes == ("10", "2")
    assert data.labels.tolist() == [0, 1, 0]


def test_jsonl_with_blank_lines_and_integer_labels(tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0, "extra": True}]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = read_labeled(path)
    assert data.classes == ("0", "1")
    assert data.labels.tolist() == [1, 0]


def test_explicit_format_overrides_suffix(tmp_path):
    path = write(tmp_path, "data.txt", "label\ttext\nx\tone\ny\ttwo\n")
    assert read_labeled(path, fmt="tsv").texts == ["one", "two"]
    message = error_of(read_labeled, path)
    assert "data.txt" in message and "csv, tsv or jsonl" in message
    assert "unknown format 'xls'" in error_of(read_labeled, path, fmt="xls")


@pytest.mark.parametrize("name, content, kwargs, expected", [
    ("d.tsv", "x\tone\ny\ttwo\tthree\n", dict(text_column="1", label_column="0"),
     "line 2 has 3 field(s), but line 1 has 2 (a tab inside a text?)"),
    ("d.csv", "label,text\nx,one\ny\n", {}, "line 3 has 1 field(s), but line 1 has 2"),
    ("d.tsv", "x\tone\n", dict(text_column="2", label_column="0"), "column 2 does not exist"),
    ("d.tsv", "x\tone\n", dict(text_column="1", label_column="text"), "not a mix"),
    ("d.tsv", "x\tone\n", dict(text_column="1", label_column="1"), "both '1'"),
    ("d.tsv", "label\ttext\nx\tone\ny\t  \n", {}, "empty text on line 3"),
    ("d.tsv", "label\ttext\nx\tone\n \ttwo\n", {}, "empty label on line 3"),
    ("d.tsv", "label\ttext\nham\tone\nham\ttwo\n", {}, "at least two classes, found only 'ham'"),
    ("d.tsv", "", {}, "holds no examples"),
    ("d.csv", "label,text\n", {}, "holds no examples"),
    ("d.csv", 'label,text\nx,"never closed\n', {}, "record starting on line 2"),
    ("d.csv", "label,text,label\nx,y,z\n", {}, "'label' appears more than once"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', {},
     "malformed JSON on line 2"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n', {}, "line 3 has no field 'label'"),
    ("d.jsonl", '["text", "label"]\n', {}, "line 1 is not a JSON object"),
    ("d.jsonl", '{"text": 5, "label": "x"}\n', {}, "field 'text' on line 1 is not a string"),
    ("d.jsonl", '{"text": "a", "label": true}\n', {}, "must be a string or an integer"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n', dict(text_column="0", label_column="1"),
     "give field names"),
])
def test_bad_files_are_reported_with_their_line(tmp_path, name, content, kwargs, expected):
    path = write(tmp_path, name, content)
    assert expected in error_of(read_labeled, path, **kwargs)


def test_invalid_utf8_names_line_and_offset(tmp_path):
    path = write(tmp_path, "d.tsv", b"label\ttext\nx\tok\ny\tbad \xff byte\n", mode="wb")
    message = error_of(read_labeled, path)
    assert "not UTF-8" in message and "0xff on line 3" in message and "byte offset 22" in message


def test_missing_file(tmp_path):
    assert "cannot read" in error_of(read_labeled, tmp_path / "nope.csv")


# -- splitting and balancing ---------------------------------------------------------------

def test_stratified_split_partitions_and_keeps_proportions():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    train, val, test = stratified_split(labels, (0.7, 0.1, 0.2), seed=3)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(100))
    assert [np.bincount(labels[s], minlength=3).tolist() for s in (train, val, test)] == \
        [[49, 14, 7], [7, 2, 1], [14, 4, 2]]
    # Shuffled across classes, not grouped, and repeatable for a seed.
    assert not np.all(np.diff(labels[train]) >= 0)
    again = stratified_split(labels, (0.7, 0.1, 0.2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    other = stratified_split(labels, (0.7, 0.1, 0.2), seed=4)
    assert not np.array_equal(train, other[0])


def test_stratified_split_gives_tiny_classes_one_per_split():
    labels = np.array([0] * 50 + [1] * 3)
    parts = stratified_split(labels)
    assert [int((labels[s] == 1).sum()) for s in parts] == [1, 1, 1]
    assert sum(len(s) for s in parts) == 53


def test_stratified_split_errors():
    assert "class 1 has 2 example(s)" in error_of(stratified_split, np.array([0] * 9 + [1] * 2))
    assert "sum to 1" in error_of(stratified_split, np.arange(10) % 2, (0.5, 0.2, 0.2))
    assert "positive" in error_of(stratified_split, np.arange(10) % 2, (0.8, 0.2, 0.0))
    assert "give 3 split fractions" in error_of(stratified_split, np.arange(10) % 2, (0.5, 0.5))


def test_balance_undersamples_to_the_smallest_class():
    labels = np.array([0] * 30 + [1] * 5 + [2] * 8)
    subset = np.arange(0, 43, dtype=np.int64)[::-1]
    kept = balance(subset, labels, seed=1)
    assert np.bincount(labels[kept]).tolist() == [5, 5, 5]
    assert len(set(kept.tolist())) == 15 and set(kept.tolist()) <= set(subset.tolist())
    assert np.array_equal(kept, balance(subset, labels, seed=1))
    assert not np.all(np.diff(labels[kept]) >= 0)  # shuffled, not grouped
    # Only classes present among the indices count.
    assert np.bincount(labels[balance(np.arange(35), labels)]).tolist() == [5, 5]
    assert len(balance(np.array([], dtype=np.int64), labels)) == 0


# -- metrics -------------------------------------------------------------------------------

CLASSES = ("cat", "dog", "eel")
# Hand-made: eel is never predicted; 5 of 9 right.
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2, 0]
Y_PRED = [0, 0, 1, 1, 1, 0, 0, 1, 0]


def test_confusion_matrix_rows_true_columns_predicted():
    m = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert m.dtype == np.int64
    assert m.tolist() == [[3, 1, 0], [1, 2, 0], [1, 1, 0]]
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 3)


def test_report_numbers_match_hand_computation():
    r = classification_report(Y_TRUE, Y_PRED, CLASSES)
    assert r["n"] == 9
    assert r["accuracy"] == pytest.approx(5 / 9)
    cat, dog, eel = (r["per_class"][c] for c in CLASSES)
    # cat: tp 3, predicted 5, true 4
    assert cat == pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4})
    # dog: tp 2, predicted 4, true 3 -> f1 = 2*0.5*(2/3)/(0.5+2/3) = 4/7
    assert dog == pytest.approx({"precision": 1 / 2, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    # eel: never predicted -> precision 0 by convention, recall 0, f1 0
    assert eel == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert r["macro_f1"] == pytest.approx((2 / 3 + 4 / 7 + 0) / 3)
    assert r["confusion"] == [[3, 1, 0], [1, 2, 0], [1, 1, 0]]
    json.dumps(r)  # JSON-ready


def test_report_perfect_predictions():
    y = [2, 0, 1, 1, 2]
    r = classification_report(y, y, CLASSES)
    assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0
    assert all(c["precision"] == c["recall"] == c["f1"] == 1.0 for c in r["per_class"].values())
    assert r["confusion"] == [[1, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_format_report_table():
    text = format_report(classification_report(Y_TRUE, Y_PRED, CLASSES), CLASSES)
    lines = text.splitlines()
    assert "accuracy  0.5556" in lines and "macro F1  0.4127" in lines
    assert lines[lines.index("class  precision  recall      f1  support") + 1] == \
        "cat       0.6000  0.7500  0.6667        4"
    assert "rows: true class, columns: predicted class" in text
    assert lines[-4].split() == ["cat", "dog", "eel"]
    assert lines[-1].split() == ["eel", "1", "1", "0"]


def test_plot_confusion_writes_a_png(tmp_path):
    path = plot_confusion(np.array([[3, 1], [0, 5]]), ["ham", "spam"], tmp_path / "cm.png")
    assert path == tmp_path / "cm.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary left behind
