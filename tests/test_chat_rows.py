"""Chat data (data.format messages or sharegpt): the recipe fields of each format, and the row checks the preflight
and the train stage share, each bad conversation refused in one line naming its row, turn and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunectl.datacheck import conversation, conversation_problem, peek_local_file
from tunectl.errors import ConfigError
from tunectl.recipe import load_recipe


def spec(*sets: str):
    return load_recipe("ruozhiba-tiny", list(sets)).data


def chat(*sets: str):
    """The tiny chat recipe's data settings (data.format messages), with `sets`."""
    return load_recipe("ruozhiba-chat-tiny", list(sets)).data


def test_each_format_has_its_layout_and_loss_default():
    alpaca = spec()
    assert (alpaca.format, alpaca.is_chat, alpaca.loss_on) == ("alpaca", False, "all")
    messages = chat().turns
    assert (messages.column, messages.role_key, messages.content_key) == ("messages", "role", "content")
    share = chat("data.format=sharegpt", "data.conversation.roles.bot=assistant")
    assert share.loss_on == "assistant"
    t = share.turns
    assert (t.column, t.role_key, t.content_key) == ("conversations", "from", "value")
    assert t.roles == {"system": "system", "user": "user", "assistant": "assistant", "human": "user",
                       "gpt": "assistant", "bot": "assistant"}  # fmt: skip
    assert chat("data.train_on=all").loss_on == "all"
    assert spec("data.train_on=assistant").loss_on == "assistant"  # Alpaca: loss on the response only


def test_test_prompts_take_the_fields_of_their_format(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        load_recipe("ruozhiba-tiny", ["data.format=messages"])  # its prompts have an Alpaca input
    assert str(e.value) == (
        "recipe ruozhiba-tiny: test_prompts[0].input is for data.format alpaca; with messages the user's message "
        "goes in instruction (and a system message in system)"
    )
    alpaca = tmp_path / "alpaca.yaml"
    alpaca.write_text("extends: ruozhiba-tiny\nname: mine\ntest_prompts:\n  - {instruction: 你好, system: 简短}\n")
    with pytest.raises(ConfigError, match=r"test_prompts\[0\]\.system is for data.format messages or sharegpt"):
        load_recipe(str(alpaca))
    prompts = load_recipe("ruozhiba-chat-tiny").test_prompts
    assert prompts[1].messages() == [{"role": "system", "content": "回答要简短、有礼貌。"},
                                     {"role": "user", "content": "我把袜子穿反了，是不是就等于没穿袜子？"}]  # fmt: skip


@pytest.mark.parametrize(
    ("sets", "says"),
    [
        (["data.format=messages", "data.prompt_template={instruction}{input}{output}"],
         "'data': prompt_template is for data.format alpaca; a messages conversation is rendered with "
         "data.chat_template"),
        (["data.format=messages", "data.add_eos=false"], "'data': add_eos is for data.format alpaca"),
        (["data.format=messages", "data.too_long=cut_prompt"],
         "'data': too_long cut_prompt is for data.format alpaca; use error or drop"),
        (["data.chat_template=chatml"], "'data': chat_template is for data.format messages or sharegpt, not alpaca"),
        (["data.conversation.column=turns"], "'data': conversation is for data.format messages or sharegpt"),
        (["data.format=messages", "data.chat_template=hello"],
         "'data.chat_template': 'hello' is not model, chatml or a Jinja template"),
        (["data.format=messages", "data.conversation.roles.bot=robot"],
         "'data.conversation.roles.bot': input should be 'system', 'user' or 'assistant'"),
        (["data.format=messages", "data.conversation.content_key=role"],
         "conversation.role_key and .content_key both name 'role'"),
    ],
)  # fmt: skip
def test_a_setting_of_the_other_format_is_refused_in_one_line(sets, says):
    with pytest.raises(ConfigError) as e:
        (chat if "data.format=messages" in sets else spec)(*(s for s in sets if s != "data.format=messages"))
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("turns", "says"),
    [
        (None, "field 'messages' is missing or null"),
        ("你好", "field 'messages' is a str, expected a list of turns"),
        ([], "field 'messages' has no turns"),
        (["你好"], "turn 1 is a str, expected an object with 'role' and 'content'"),
        ([{"content": "你好"}], "turn 1 has no 'role'"),
        ([{"role": 1, "content": "你好"}], "turn 1: 'role' is a number (quote it, as the text the model should "
                                           "learn), expected text"),
        ([user("你好"), {"role": "bot", "content": "嗯"}],
         "turn 2: role 'bot' is not one of system, user, assistant (map it with --set "
         "data.conversation.roles.bot=user|assistant|system)"),
        ([{"role": "user"}], "turn 1 (user) has no 'content'"),
        ([user("你好"), {"role": "assistant", "content": ["嗯"]}],
         "turn 2 (assistant): 'content' is a list, expected text"),
        ([user("你好"), bot("  ")], "turn 2 (assistant) is empty"),
        ([user("你好"), bot("嗯"), {"role": "system", "content": "别说话"}],
         "turn 3 is a system turn; only the first turn may be one"),
        ([bot("我先说")], "turn 1 is assistant (assistant); a conversation starts with the user"),
        ([{"role": "system", "content": "简短回答"}, bot("好")],
         "turn 2 is assistant (assistant); a conversation starts with the user"),
        ([user("一"), user("二"), bot("三")], "turn 2 is user (user); it follows a user turn; user and assistant take "
                                              "turns"),
        ([user("一"), bot("二"), bot("三")], "turn 3 is assistant (assistant); it follows an assistant turn"),
        ([user("一"), bot("二"), user("三")],
         "the last turn is user; a conversation ends with the assistant's answer, which is what trains"),
        ([{"role": "system", "content": "简短回答"}],
         "the last turn is system; a conversation ends with the assistant's answer"),
    ],
)  # fmt: skip
def test_each_bad_conversation_names_its_turn(turns, says):
    problem = conversation_problem(turns, chat())
    assert problem is not None and problem.startswith(says), problem


def test_a_sharegpt_conversation_becomes_messages():
    s = chat("data.format=sharegpt")
    row = {"conversations": [{"from": "system", "value": "简短回答"}, {"from": "human", "value": "一加一"},
                             {"from": "gpt", "value": "二。"}, {"from": "human", "value": "再加一"},
                             {"from": "gpt", "value": "三。"}]}  # fmt: skip
    assert conversation_problem(row["conversations"], s) is None
    assert conversation(row, s) == [{"role": "system", "content": "简短回答"}, user("一加一"), bot("二。"),
                                    user("再加一"), bot("三。")]  # fmt: skip
    problem = conversation_problem([{"from": "human", "value": "一"}, {"from": "bot", "value": "二"}], s)
    assert problem is not None and problem.startswith("turn 2: role 'bot' is not one of system, user, assistant, "
                                                      "human, gpt")  # fmt: skip


def test_a_local_file_is_checked_row_by_row_and_read_once(tmp_path: Path):
    s = chat()
    good = [{"messages": [user("为什么月亮跟着我走"), bot("因为它太远了。")], "id": 1},
            {"messages": [user("一加一"), bot("二。"), user("再加一"), bot("三。")], "id": [2]}]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good), encoding="utf-8")
    local = peek_local_file(path, s, str(path))
    assert local is not None and local.lines == [1, 2]
    assert local.rows == [{"messages": r["messages"]} for r in good]  # only the column that trains
    bad = [*good, {"messages": [user("你是谁"), {"role": "bot", "content": "我是猫。"}]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in bad), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        peek_local_file(path, s, "chat.jsonl")
    assert str(e.value).startswith("data set chat.jsonl row 3 (line 3): turn 2: role 'bot' is not one of ")
    assert str(e.value).endswith("; fix or remove the row")
    with pytest.raises(ConfigError, match=r"^data set chat.jsonl has no 'messages' column \(found: turns\); rename "
                                          r"it or map it with --set data.conversation.column=<column>$"):  # fmt: skip
        path.write_text(json.dumps({"turns": good[0]["messages"]}, ensure_ascii=False), encoding="utf-8")
        peek_local_file(path, s, "chat.jsonl")
    csv = tmp_path / "chat.csv"
    csv.write_text("messages\nhello\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="a CSV file holds text cells, not conversations; use JSON Lines"):
        peek_local_file(csv, s, "chat.csv")


def test_a_chat_runs_modelfile_carries_its_go_template_or_refuses_in_one_line():
    from tunectl.contract import ContractError
    from tunectl.ollama import modelfile

    go = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    contract = {"format": "messages", "chat_template": "...", "stop_tokens": ["<|im_end|>"], "ollama_template": go}
    text = modelfile("run.Q4_K_M.gguf", contract)
    assert text == f'FROM ./run.Q4_K_M.gguf\nTEMPLATE """{go}"""\nPARAMETER stop "<|im_end|>"\n'
    assert "SYSTEM" not in text  # a SYSTEM line would replace the template's own default system message
    refused = {**contract, "ollama_template": None, "ollama_refusal": "it is not ChatML (...)"}
    with pytest.raises(ContractError) as e:
        modelfile("run.gguf", refused)
    assert str(e.value) == (
        "the run's chat template is not one tunectl can write for Ollama: it is not ChatML (...); its GGUF carries "
        "the template for llama.cpp, and `tunectl pull --to vllm` serves it as trained"
    )
