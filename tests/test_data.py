"""Loading Alpaca data with `datasets` from each local format the train stage accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunectl.errors import ConfigError
from tunectl.recipe import load_recipe

pytestmark = pytest.mark.ml

datasets = pytest.importorskip("datasets")

ROWS = [
    {"instruction": "为什么天是蓝的", "input": "", "output": "因为散射。"},
    {"instruction": "请用中文回答", "input": "一加一", "output": "二。"},
]


def _write(path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_formats_load_and_format_with_eos(tmp_path, suffix):
    from tunectl_jobs.data import format_alpaca, load

    spec = load_recipe("ruozhiba-tiny", [f"data.source={_write(tmp_path / ('d' + suffix))}"]).data
    ds = load(spec)
    assert len(ds) == 2
    texts = format_alpaca(ds, spec, "</s>")["text"]
    assert texts[0].endswith("### Input:\n\n\n### Response:\n因为散射。</s>")
    assert "### Instruction:\n请用中文回答\n\n### Input:\n一加一\n\n### Response:\n二。</s>" in texts[1]


def test_column_mapping_and_max_rows(tmp_path):
    from tunectl_jobs.data import format_alpaca, load

    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"q": r["instruction"], "a": r["output"]}, ensure_ascii=False) + "\n" for r in ROWS)
    )
    spec = load_recipe(
        "ruozhiba-tiny",
        [f"data.source={path}", "data.columns.instruction=q", "data.columns.output=a", "data.max_rows=1"],
    ).data
    ds = load(spec)
    assert len(ds) == 1
    assert format_alpaca(ds, spec, "<eos>")["text"][0].endswith("### Response:\n因为散射。<eos>")


def test_bundled_sample_is_valid_alpaca():
    from tunectl_jobs.data import load

    ds = load(load_recipe("ruozhiba-tiny").data)
    assert len(ds) >= 60 and set(ds.column_names) == {"instruction", "input", "output"}
    assert all(row["output"].strip() for row in ds)


def test_empty_parquet_is_refused(tmp_path):
    from tunectl_jobs.data import load

    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_list(ROWS).select([]).to_parquet(str(path))
    with pytest.raises(ConfigError, match="has no rows"):
        load(load_recipe("ruozhiba-tiny", [f"data.source={path}"]).data)


def _check_and_load(path: Path):
    """The submit-time check and the train stage's loading, which must agree on what a file holds."""
    from tunectl.datacheck import peek_local_file
    from tunectl_jobs.data import load

    spec = load_recipe("ruozhiba-tiny", [f"data.source={path}"]).data
    peek_local_file(path, spec, str(path))
    return load(spec)


def test_a_json_file_with_one_record_per_line_is_read_as_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    assert len(_check_and_load(path)) == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_utf8_byte_order_mark_is_read_where_datasets_reads_it(tmp_path, suffix):
    path = _write(tmp_path / ("d" + suffix))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = _check_and_load(path)
    assert ds.column_names[0] == "instruction" and ds[1]["output"] == "二。"


def test_a_utf8_byte_order_mark_in_a_json_document_is_refused(tmp_path):
    path = _write(tmp_path / "d.json")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    with pytest.raises(ConfigError, match="the JSON starts with a byte-order mark; save it as UTF-8 without a BOM"):
        _check_and_load(path)


def test_records_under_a_key_are_refused_naming_it(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 1, "data": ROWS}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ConfigError, match="the records are under the key 'data'; make the file a JSON array"):
        _check_and_load(path)


def test_an_unsupported_file_type_is_refused_before_loading(tmp_path):
    from tunectl.datacheck import peek_local_file

    path = tmp_path / "d.txt"
    path.write_text("instruction: hi\n")
    spec = load_recipe("ruozhiba-tiny", [f"data.source={path}"]).data
    with pytest.raises(ConfigError, match=r"unsupported file type '\.txt' \(use \.json, \.jsonl, \.parquet, \.csv\)"):
        peek_local_file(path, spec, str(path))


def test_only_the_rows_that_train_are_checked(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [*ROWS, {"instruction": "问", "output": {"not": "text"}}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    from tunectl_jobs.data import load

    with pytest.raises(ConfigError, match=r"row 3 \(line 3\): field 'output' is an object"):
        load(load_recipe("ruozhiba-tiny", [f"data.source={path}"]).data)
    assert len(load(load_recipe("ruozhiba-tiny", [f"data.source={path}", "data.max_rows=2"]).data)) == 2


def test_a_column_the_recipe_does_not_use_may_hold_anything(tmp_path):
    """Mixed types in an extra column (and a blank line) made pyarrow's JSON reader fail the whole file."""
    path = tmp_path / "d.jsonl"
    rows = [{**ROWS[0], "id": 1}, None, {**ROWS[1], "id": {"source": "web"}}]
    path.write_text("".join(("" if r is None else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    ds = _check_and_load(path)
    assert len(ds) == 2 and ds[1]["input"] == "一加一"
