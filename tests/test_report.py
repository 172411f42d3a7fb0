"""The report's arithmetic and the evaluation settings, without a run: the FLOPs count behind MFU checked against
Llama-3-8B's published parameter counts, the GPU peak table, the inline SVG charts, and the recipe's held-out
and fidelity settings refused in one line where they cannot work."""

from __future__ import annotations

import json
import re

import pytest

from tunectl.datacheck import peek_local_file
from tunectl.errors import ConfigError
from tunectl.recipe import load_recipe
from tunectl.report import flops_per_token, peak_tflops, svg_chart

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "head_dim": 128}  # fmt: skip
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_flops_per_token_counts_the_frozen_linear_layers_and_the_lora_weights():
    # Published: Llama-3-8B has 8.03e9 parameters, 525,336,576 of them in the input embedding (not a matmul);
    # LoRA r=16 on the seven projections trains 41,943,040 (what Unsloth prints for the reference recipe).
    frozen = 8.030261248e9 - 525_336_576 - (2 * 32 + 1) * 4096  # the RMSNorm weights are not matmuls either
    want = 4 * frozen + 6 * 41_943_040
    assert flops_per_token(LLAMA3_8B, 16, SEVEN) == pytest.approx(want, rel=1e-9)
    assert flops_per_token(LLAMA3_8B, 16, ["q_proj"]) < flops_per_token(LLAMA3_8B, 16, SEVEN)


@pytest.mark.parametrize(
    ("device", "tflops"),
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("cpu", None), (None, None), ("Tesla T4", None)],
)  # fmt: skip
def test_peak_tflops_by_the_name_torch_gives(device, tflops):
    assert peak_tflops(device) == tflops


def test_a_chart_has_one_point_per_step_and_no_script():
    svg = svg_chart("Loss", [("training", [(1, 2.5), (2, 2.0), (3, float("nan"))], "#000"),
                             ("held-out", [(0, 3.0), (3, 1.5)], "#f00")], "loss", "c")  # fmt: skip
    assert svg.startswith('<svg id="c"') and "<script" not in svg
    assert svg.count("<circle") == 4  # the NaN point is left out
    assert re.findall(r'data-series="([^"]+)"', svg) == ["training", "held-out"]
    assert svg_chart("Empty", [("x", [], "#000")], "y", "e") == ""


@pytest.mark.parametrize(
    ("sets", "says"),
    [
        (["data.eval_rows=4", "data.eval_split=test"], "eval_rows and eval_split both hold out rows: set one"),
        (["data.eval_rows=null", "training.eval_steps=5"],
         "training.eval_steps needs held-out rows: set data.eval_rows or data.eval_split"),
        (["data.eval_rows=null", "data.eval_split=train"], "eval_split 'train' is the training split"),
        (["export.fidelity_tokens=0", "export.max_kld=0.05"], "max_kld needs the fidelity measured"),
        (["export.max_kld=0"], "greater than 0"),
    ],
)  # fmt: skip
def test_evaluation_settings_that_cannot_work_are_refused_in_one_line(sets, says):
    with pytest.raises(ConfigError) as e:
        load_recipe("ruozhiba-tiny", sets)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_holding_out_every_row_or_a_files_other_split_is_refused_before_a_run_exists(tunectl, store, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"问题{i}", "output": "答"}) + "\n" for i in range(5)))
    local = peek_local_file(path, load_recipe("ruozhiba-tiny", ["data.eval_rows=5"]).data, "rows.jsonl")
    assert local is not None and local.count == 5  # the file itself is fine: holding out is the recipe's business
    for sets, says in (
        (["data.eval_rows=5"], f"data.eval_rows 5 would hold out every row of data set {path} (5 rows): lower it"),
        (["data.eval_rows=9", "data.max_rows=3"],
         f"data.eval_rows 9 would hold out every row of data set {path} (3 rows after data.max_rows): lower it"),
        (["data.eval_rows=null", "data.eval_split=test"],
         "data.eval_split 'test': a local file has one split; hold rows out with data.eval_rows"),
    ):  # fmt: skip
        args = [a for s in [f"data.source={path}", *sets] for a in ("--set", s)]
        proc = tunectl("submit", "ruozhiba-tiny", "--backend", "local", *args)
        assert proc.returncode == 78 and proc.stderr.strip() == f"error: {says}", proc.stderr
    assert not (store / "runs").exists() or not list((store / "runs").iterdir())
