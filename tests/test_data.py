"""Loading Alpaca data with `datasets` from each local format the train stage accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunectl.errors import ConfigError
from tunectl.recipe import load_recipe

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
