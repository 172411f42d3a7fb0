from __future__ import annotations

import subprocess
import sys

import yaml


def test_help_and_recipe_commands_do_not_import_heavy_libraries():
    code = (
        "import sys; from click.testing import CliRunner; from tunectl.cli import cli; r = CliRunner();"
        "assert r.invoke(cli, ['--help']).exit_code == 0; assert r.invoke(cli, ['recipes']).exit_code == 0;"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl', 'peft', 'llama_cpp') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_recipes_lists_and_shows_resolved(tunectl):
    listing = tunectl("recipes", check=True).stdout
    assert listing.splitlines()[0].startswith("ruozhiba ") and "ruozhiba-tiny" in listing
    shown = yaml.safe_load(tunectl("recipes", "show", "ruozhiba-tiny", "--set", "lora.r=8", check=True).stdout)
    assert shown["lora"]["r"] == 8 and shown["training"]["optim"] == "adamw_8bit"
    assert shown["data"]["prompt_template"].endswith("### Response:\n{output}")
    shown = tunectl("recipes", "show", "ruozhiba", "--set", "training.nproc_per_node=2", check=True).stdout
    assert shown.splitlines()[-1] == (
        "# rows per optimizer step: per-device batch 1 x gradient accumulation 4 x processes 2 = 8"
    )


def test_recipes_show_gives_a_chat_recipe_its_own_fields_and_reads_back_as_the_same_recipe(tunectl, tmp_path):
    from tunectl.recipe import load_recipe, recipe_from_file

    shown_text = tunectl("recipes", "show", "ruozhiba-chat-tiny", check=True).stdout
    data = yaml.safe_load(shown_text)["data"]
    assert {"prompt_template", "columns", "add_eos"}.isdisjoint(data)
    assert data["conversation"] == {"column": "messages", "role_key": "role", "content_key": "content", "roles": {}}
    assert data["train_on"] == "assistant" and data["chat_template"] == "model"
    shown = tmp_path / "shown.yaml"
    shown.write_text(shown_text)
    assert recipe_from_file(shown).to_yaml() == load_recipe("ruozhiba-chat-tiny").to_yaml().replace(
        "train_on: null", "train_on: assistant"
    ).replace("column: ''", "column: messages").replace("role_key: ''", "role_key: role").replace(
        "content_key: ''", "content_key: content"
    )
    alpaca = yaml.safe_load(tunectl("recipes", "show", "ruozhiba", check=True).stdout)
    assert "conversation" not in alpaca["data"] and "chat_template" not in alpaca["data"]
    assert alpaca["data"]["train_on"] == "all" and all("system" not in p for p in alpaca["test_prompts"])


def test_local_backend_refuses_several_nodes(tunectl, store):
    proc = tunectl("submit", "ruozhiba-tiny", "--backend", "local", "--set", "training.nnodes=2")
    assert proc.returncode == 78 and proc.stderr.strip() == (
        "error: training.nnodes 2: the local backend runs on one machine; use --backend kubernetes, or "
        "training.nnodes 1 with training.nproc_per_node"
    )
    assert not (store / "runs").exists() or not list((store / "runs").iterdir())


def test_list_on_an_empty_store(tunectl, store):
    assert tunectl("list", check=True).stdout.strip() == f"no runs in {store.resolve().as_uri()}"
    assert tunectl("list", "-o", "json", check=True).stdout.strip() == "[]"
