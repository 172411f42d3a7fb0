"""Hostile and careless recipes, templates and --set values (issue 13, items 5, 7, 8, 10).

Each case goes through the real `tunectl` command and must end in one line, exit 78, no traceback and no run:
the next probe of this kind should find nothing.
"""

from __future__ import annotations

import textwrap

import jinja2
import pytest
import yaml
from conftest import no_runs, one_line_error
from gotemplate import go_render

from tunectl.contract import chat_template
from tunectl.ollama import modelfile
from tunectl.recipe import ALPACA_TEMPLATE, load_recipe


def bomb(depth: int) -> str:
    """A recipe whose lora.loftq_config expands to 9**depth leaves from a few hundred bytes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    anchors = textwrap.indent("\n".join(lines), "    ")
    return f"extends: ruozhiba-tiny\nname: bomb\nlora:\n  loftq_config:\n{anchors}\n"


@pytest.mark.parametrize("where", ["file", "set"])
def test_yaml_alias_bomb_is_refused_at_once(tunectl, store, tmp_path, where):
    if where == "file":
        path = tmp_path / "bomb.yaml"
        path.write_text(bomb(9), encoding="utf-8")
        args = ("recipes", "show", str(path))
    else:
        args = ("recipes", "show", "ruozhiba-tiny", "--set", "lora.loftq_config={a: &a [1, 1], b: [*a, *a]}")
    proc = tunectl(*args, timeout=120)  # the old loader expanded it until it ran out of memory
    assert "YAML aliases (*a" in one_line_error(proc) and "are not supported" in proc.stderr
    no_runs(store)


def test_a_huge_recipe_file_is_refused_without_reading_it(tunectl, tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("w") as f:
        f.write("name: huge\n")
        f.truncate(64 << 20)
    assert "larger than 1024 KiB" in one_line_error(tunectl("recipes", "show", str(path)))


def test_a_recipe_in_another_encoding_is_one_line(tunectl, tmp_path):
    path = tmp_path / "utf16.yaml"
    path.write_bytes("extends: ruozhiba-tiny\nname: utf16\n".encode("utf-16"))
    assert "not UTF-8 text" in one_line_error(tunectl("recipes", "show", str(path)))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{0} {instruction} {input} {output}", "placeholder {0}: only {instruction}, {input} and {output}"),
        ("{} {instruction} {input} {output}", "placeholder {}: only"),
        ("{instruction.__class__} {input} {output}", "placeholder {instruction.__class__}"),
        ("{instruction[0]} {input} {output}", "placeholder {instruction[0]}"),
        ("{instruction!r} {input} {output}", "has {instruction!r}: placeholders take no conversion or format"),
        ("{instruction:>10} {input} {output}", "has {instruction:>10}: placeholders take no conversion"),
        ("{instruction} {input} {output} {output}", "has {output} twice"),
        ("{instruction} {instruction} {input} {output}", "has {instruction} twice"),
        ("{instruction} { {input} {output}", "is not a valid template"),
        ("{instruction} } {input} {output}", "is not a valid template"),
        ("{instruction} {input} {output} tail", "must end with {output}"),
        ("{instruction} {{input}} {output}", "must contain the placeholder {input}"),
        ('"""{instruction} {input} {output}', 'contains """'),
    ],
)
def test_prompt_template_allows_exactly_three_plain_fields(tunectl, store, template, expected):
    proc = tunectl("submit", "ruozhiba-tiny", "--set", f"data.prompt_template={template}")
    line = one_line_error(proc)
    assert "'data.prompt_template'" in line and expected in line, line
    no_runs(store)


@pytest.mark.parametrize(
    "template",
    [
        ALPACA_TEMPLATE,
        # Escaped braces, a brace right before a field, Go and Jinja delimiters as plain text, quotes.
        'JSON {{"task": "{instruction}"}} ctx={{{input}}} {{{{ .System }}}} {{% raw %}} "q" \\ \n### A:\n{output}',
        "{{{instruction}}}{input}{{ {output}",
        "指令：{instruction}\n输入：{input}\n}}}}回答：{output}",
    ],
)
def test_every_renderer_reads_the_template_as_training_does(tmp_path, template):
    """The trained text (str.format), the vLLM chat template (Jinja) and the Ollama TEMPLATE (Go) render the
    same prompt, for both prompt shapes, whatever literal braces and delimiters the template holds."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"extends": "ruozhiba-tiny", "name": "t", "data": {"prompt_template": template}}))
    r = load_recipe(str(path))
    system, user = "系统 {x} }} {{", 'user "text" {{ .Prompt }}'
    expect_with = r.data.prompt_template.format(instruction=system, input=user, output="")
    expect_without = r.data.prompt_template.format(instruction=user, input="", output="")
    assert r.prompt_for(system, user) == expect_with

    jinja = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template(r.data.prompt_template))
    common = {"eos_token": "</s>", "add_generation_prompt": True}
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    assert jinja.render(messages=msgs, **common) == expect_with
    assert jinja.render(messages=msgs[1:], **common) == expect_without

    contract = {"prompt_template": r.data.prompt_template, "stop_tokens": ["<|im_end|>"]}
    text = modelfile("m.gguf", contract)
    go_template = text.split('TEMPLATE """', 1)[1].split('"""\n', 1)[0]
    got = go_render(tmp_path, go_template, [{"System": system, "Prompt": user}, {"System": "", "Prompt": user}])
    assert got == [expect_with, expect_without]


def test_set_with_a_mapping_merges_into_the_section(tunectl):
    proc = tunectl("recipes", "show", "ruozhiba-tiny", "--set", "training={max_steps: 3}", check=True)
    doc = yaml.safe_load(proc.stdout)
    base = load_recipe("ruozhiba-tiny")
    assert doc["training"]["max_steps"] == 3
    assert doc["training"]["learning_rate"] == base.training.learning_rate
    assert doc["training"]["optim"] == base.training.optim
    # A list still replaces a list: merging lists element-wise would be a guess.
    proc = tunectl("recipes", "show", "ruozhiba-tiny", "--set", "lora.target_modules=[q_proj]", check=True)
    assert yaml.safe_load(proc.stdout)["lora"]["target_modules"] == ["q_proj"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.learning_rate=.inf", "'training.learning_rate': input should be a finite number"),
        ("training.learning_rate=.nan", "'training.learning_rate': input should be a finite number"),
        ("training.learning_rate=5", "'training.learning_rate': input should be less than or equal to 1"),
        ("training.max_steps=true", "'training.max_steps': input should be a valid integer"),
        ("training.max_steps=2.5", "'training.max_steps': input should be a valid integer"),
        ("training.seed=99999999999", "'training.seed': input should be less than or equal to 4294967295"),
        ("model.max_seq_length=.inf", "'model.max_seq_length': input should be a valid integer"),
        ("lora.r=100000", "'lora.r': input should be less than or equal to 4096"),
        ("test_prompts=[{instruction: hi, max_new_tokens: 10000000}]", "less than or equal to 32768"),
        ("training..max_steps=3", "has an empty part"),
        ("export.smoke_test=maybe", "'export.smoke_test': input should be 'stop', 'answer' or 'off'"),
        ("training.sample_answers=sometimes", "'training.sample_answers': input should be a valid boolean"),
    ],
)
def test_numbers_are_bounded_and_never_coerced_from_booleans(tunectl, store, override, expected):
    line = one_line_error(tunectl("submit", "ruozhiba-tiny", "--set", override))
    assert expected in line, line
    no_runs(store)


def test_a_builtin_name_cannot_reach_outside_the_recipes_directory(tunectl, tmp_path):
    # With no such path here, the old lookup joined it onto the built-in directory and loaded the file there.
    proc = tunectl("recipes", "show", "../recipes/ruozhiba-tiny")
    assert "unknown recipe '../recipes/ruozhiba-tiny'" in one_line_error(proc)


@pytest.mark.parametrize(
    "ref",
    ["package:tunectl/../../../../etc/hostname", "package:tunectl//etc/hostname", "package:os.path/x", "package:/x"],
)
def test_a_package_reference_stays_inside_its_package(tunectl, store, ref):
    """On a cluster a package: reference is a file in the image: it must not climb out to other files there."""
    line = one_line_error(tunectl("submit", "ruozhiba-tiny", "--set", f"data.source={ref}"))
    assert "expected package:<module>/<file inside it>" in line, line
    no_runs(store)
