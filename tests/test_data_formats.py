"""Data as users have it: csv, parquet, a JSON list and dataset folders read like jsonl, with errors that name the
file, the line (csv) or row index (parquet, JSON list, dataset), and the field."""

import csv
import json

import pytest

from conftest import learnable_rows, tiny_args, write_jsonl

ROWS = learnable_rows(24, 7)


def _csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category", "output"])
        for r in rows:  # category as one separated string: how a spreadsheet holds it
            w.writerow([r["text"], "、".join(r["category"]), r["output"]])
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _json_list(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _saved_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _hf_folder(path, rows):
    """A folder of data files, as a dataset repository holds them: ``hf:FOLDER`` loads it as load_dataset does."""
    path.mkdir()
    write_jsonl(path / "train.jsonl", rows)
    return f"hf:{path}"


@pytest.mark.parametrize("writer,name", [(_csv, "d.csv"), (_parquet, "d.parquet"), (_json_list, "d.json"),
                                         (_saved_dataset, "saved"), (_hf_folder, "repo")])
def test_every_format_gives_the_jsonl_rows(tmp_path, writer, name):
    from llmcls.config import DataConfig
    from llmcls.data import read_rows

    cfg = DataConfig()
    want, _ = read_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), cfg)
    got, invalid = read_rows(writer(tmp_path / name, ROWS), cfg)
    assert not invalid
    assert [(r.text, r.candidates, r.label) for r in got] == [(r.text, r.candidates, r.label) for r in want]


def test_modelscope_id_reads_the_downloaded_files(tmp_path, monkeypatch):
    """ModelScope cannot be reached here: its download is replaced by a folder laid out as the tutorial's dataset
    repository (train.jsonl, test.jsonl); the split picks the file."""
    import importlib

    from llmcls.config import DataConfig
    from llmcls.data import read_rows

    repo = tmp_path / "zh_cls_fudan-news"
    write_jsonl(repo / "train.jsonl", ROWS[:10])
    write_jsonl(repo / "test.jsonl", ROWS[10:13])
    ms = importlib.import_module("modelscope.hub.snapshot_download")  # the module; the package attribute is the function
    asked = []
    monkeypatch.setattr(ms, "dataset_snapshot_download", lambda name: asked.append(name) or str(repo))
    train, _ = read_rows("modelscope:swift/zh_cls_fudan-news", DataConfig())
    test, _ = read_rows("modelscope:swift/zh_cls_fudan-news:test", DataConfig())
    assert asked == ["swift/zh_cls_fudan-news"] * 2
    assert [r.text for r in train] == [r["text"] for r in ROWS[:10]]
    assert [r.text for r in test] == [r["text"] for r in ROWS[10:13]]


def test_missing_split_is_named(tmp_path):
    from llmcls.config import DataConfig
    from llmcls.data import read_rows

    with pytest.raises(ValueError, match=r"hf:.*:dev"):
        read_rows(_hf_folder(tmp_path / "repo", ROWS) + ":dev", DataConfig())


def test_report_finds_texts_by_line_or_row(tmp_path):
    from llmcls.data import texts_at

    rows = [{**r, "text": f"{r['text']} #{i}"} for i, r in enumerate(ROWS[:5])]
    rows[1]["text"] = "two\nlines"  # csv: the rows after it start a line later
    assert texts_at(_csv(tmp_path / "t.csv", rows), "text", {2, 3, 5}) == {2: rows[0]["text"], 3: "two\nlines",
                                                                            5: rows[2]["text"]}
    assert texts_at(_parquet(tmp_path / "t.parquet", rows), "text", {0, 4}) == {0: rows[0]["text"],
                                                                                4: rows[4]["text"]}
    assert texts_at(write_jsonl(tmp_path / "t.jsonl", rows), "text", {2}) == {2: "two\nlines"}


def test_column_mapping_applies_to_csv(tmp_path):
    from llmcls.config import DataConfig
    from llmcls.data import read_rows

    path = tmp_path / "renamed.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["body", "choices", "gold"])
        w.writerow(["football match", "Sport,Politics", "Sport"])
    rows, _ = read_rows(path, DataConfig(text_field="body", category_field="choices", output_field="gold"))
    assert (rows[0].text, rows[0].candidates, rows[0].label) == ("football match", ["Sport", "Politics"], "Sport")


def test_bad_rows_name_file_line_or_row_and_field(tmp_path):
    from llmcls.config import DataConfig
    from llmcls.data import DataError, read_rows

    rows = [dict(r) for r in ROWS[:4]]
    rows[2] = {**rows[2], "output": "Weather"}
    rows[1] = {**rows[1], "text": "a text\nover two lines"}  # quoted cell: the bad row starts on line 4, not 3
    path = _csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as e:
        read_rows(path, DataConfig())
    assert str(e.value).startswith(f"{path}:5: field 'output': 'Weather' is not among")
    assert (e.value.line, e.value.field) == (5, "output")
    first = _csv(tmp_path / "first.csv", [{**ROWS[0], "text": " "}])  # the header is line 1
    with pytest.raises(DataError, match=r"first\.csv:2: field 'text': empty"):
        read_rows(first, DataConfig())

    pq = _parquet(tmp_path / "bad.parquet", [ROWS[0], {**ROWS[1], "text": " "}])
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: field 'text': empty"):
        read_rows(pq, DataConfig())
    # skipped, not fatal, when asked: the good rows stay, the bad one is counted with its location
    good, invalid = read_rows(pq, DataConfig(), on_invalid="skip")
    assert len(good) == 1 and [(i.line, i.unit, i.field) for i in invalid] == [(1, "row", "text")]


def test_csv_trains_through_the_cli(tmp_path, tokenizer_dir):
    from llmcls.cli import main
    from llmcls.rundir import RunDir

    train = _csv(tmp_path / "train.csv", learnable_rows(32, 8))
    test = _parquet(tmp_path / "test.parquet", learnable_rows(8, 9))
    out = tmp_path / "run"
    assert main(["train", *tiny_args(train, test, out, **{"train.max_steps": 2, "train.epochs": 1})]) == 0
    summary = json.loads(RunDir(out).data.summary.read_text())
    assert summary["rows"] == 32 and summary["invalid"] == 0
    assert main(["eval", str(out), "--test", str(test)]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["rows"] == 8
