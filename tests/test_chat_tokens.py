"""Conversations tokenized for training with the tiny model's tokenizer: the assistant's tokens marked through each
turn's stop token and nothing else, for the model's own template (ChatML with a default system prompt) and
tunectl's ChatML; templates whose marks could be wrong are refused."""

from __future__ import annotations

import pytest

from tunectl.errors import ConfigError, TunectlError
from tunectl.recipe import load_recipe

pytestmark = pytest.mark.ml

pytest.importorskip("transformers")

RECIPE = load_recipe("ruozhiba-chat-tiny")
TALK = [
    {"role": "user", "content": "一加一"},
    {"role": "assistant", "content": "等于二。"},
    {"role": "user", "content": "再加一呢？"},
    {"role": "assistant", "content": "三。"},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tunectl_jobs.models import base_model_path

    return AutoTokenizer.from_pretrained(base_model_path(RECIPE.model.name))


def marked(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize("template", ["model", "chatml"])
def test_only_the_assistant_turns_and_their_stop_tokens_are_marked(tok, template):
    from tunectl_jobs import chat

    spec = load_recipe("ruozhiba-chat-tiny", [f"data.chat_template={template}"]).data
    text = chat.template_for(spec, tok, RECIPE.model.name)
    ids, mask = chat.tokenize(tok, text, TALK, [2], masks=True)
    rendered = tok.decode(ids)
    assert rendered.endswith("<|im_start|>assistant\n三。<|im_end|>\n")
    assert ("You are a helpful AI assistant named SmolLM" in rendered) == (template == "model")
    assert marked(tok, ids, mask) == "等于二。<|im_end|>三。<|im_end|>"
    assert mask[-1] == 0  # the newline ChatML writes after <|im_end|> is the template's, not the answer's
    assert chat.tokenize(tok, text, TALK, [2], masks=False) == (ids, None)


def test_templates_whose_marks_could_be_wrong_are_refused(tok):
    from tunectl_jobs import chat

    # Shows only the newest exchange: the conversation so far is not the start of the whole one.
    newest_only = (
        "{%- for m in messages[-2:] -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    with pytest.raises(ValueError, match="^turn 2: the chat template does not render the conversation up to this"):
        chat.tokenize(tok, newest_only, TALK, [2], masks=True)
    no_stop = chat.CHATML.replace("'<|im_end|>'", "'\\n'")
    with pytest.raises(ValueError, match=r"^turn 2: the chat template ends the assistant's turn without a stop token"):
        chat.tokenize(tok, no_stop, TALK, [2], masks=True)


def test_a_model_without_a_chat_template_needs_one_named(tok):
    from tunectl_jobs import chat

    class Bare:
        chat_template = None

    with pytest.raises(ConfigError, match="has no chat template of its own: set data.chat_template to chatml"):
        chat.template_for(RECIPE.data, Bare(), "some/base")
    assert chat.template_for(RECIPE.data, tok, RECIPE.model.name) == tok.chat_template


def test_a_data_set_of_conversations_becomes_token_ids_and_marks_with_too_long_applied(tok):
    import datasets

    from tunectl_jobs import chat

    long_talk = [{"role": "user", "content": "讲个故事"}, {"role": "assistant", "content": "从前有座山。" * 60}]
    ds = datasets.Dataset.from_list([{"messages": TALK}, {"messages": long_talk}])
    text = chat.template_for(RECIPE.data, tok, RECIPE.model.name)
    with pytest.raises(ConfigError) as e:
        chat.tokenized_dataset(ds, RECIPE.data, tok, text, [2], 128, lines=[1, 2])
    assert str(e.value).startswith(f"data set {RECIPE.data.source}: 1 of 2 conversations are longer than "
                                   "model.max_seq_length (128 tokens; first: row 2 (line 2) with ")  # fmt: skip
    drop = load_recipe("ruozhiba-chat-tiny", ["data.too_long=drop"]).data
    out, counts = chat.tokenized_dataset(ds, drop, tok, text, [2], 128)
    assert out.column_names == ["input_ids", "assistant_masks"] and len(out) == 1
    assert counts["rows_dropped"] == 1 and counts["rows_trained"] == 1 and counts["longest_row_tokens"] > 128
    assert marked(tok, out[0]["input_ids"], out[0]["assistant_masks"]) == "等于二。<|im_end|>三。<|im_end|>"
    every = load_recipe("ruozhiba-chat-tiny", ["data.train_on=all"]).data
    out, _ = chat.tokenized_dataset(ds.select([0]), every, tok, text, [2], 128)
    assert out.column_names == ["input_ids"]
    bad = datasets.Dataset.from_list([{"messages": TALK}])
    with pytest.raises(ConfigError, match=r"row 1: turn 2: the chat template ends the assistant's turn without a stop"):
        chat.tokenized_dataset(bad, RECIPE.data, tok, chat.CHATML.replace("'<|im_end|>'", "'\\n'"), [2], 128)


def test_trl_turns_the_marks_into_labels_so_only_the_answers_train(tok, tmp_path):
    """The pinned TRL takes the pre-tokenized set as it is and builds the labels from `assistant_masks`: the batch
    the model trains on has -100 on everything but the answers and their stop tokens."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunectl_jobs import chat, train
    from tunectl_jobs.models import base_model_path

    ds, _ = chat.tokenized_dataset(datasets.Dataset.from_list([{"messages": TALK}]), RECIPE.data, tok,
                                   chat.template_for(RECIPE.data, tok, RECIPE.model.name), [2], 512)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(base_model_path(RECIPE.model.name))
    args = SFTConfig(output_dir=str(tmp_path), max_length=512, report_to="none", use_cpu=True, max_steps=1)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0].tolist()
    assert tok.decode([t for t in labels if t != -100]) == "等于二。<|im_end|>三。<|im_end|>"
    assert batch["input_ids"][0].tolist() == ds[0]["input_ids"]
    # the train stage's own check of the trainer it built, and what it says of one that drops the marks
    answers = len(tok("等于二。<|im_end|>三。<|im_end|>")["input_ids"])
    total = len(ds[0]["input_ids"])
    assert train.check_loss_tokens(trainer, "assistant", ds) == {
        "loss_tokens_checked": answers,
        "tokens_checked": total,
    }
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: {**collate(rows), "labels": collate(rows)["input_ids"]}
    with pytest.raises(TunectlError) as e:
        train.check_loss_tokens(trainer, "assistant", ds)
    assert str(e.value) == (
        f"the trainer would put the loss on {total - 1} tokens of its first 1 rows where data.train_on assistant "
        f"marks {answers} (row 0 {total - 1} not {answers}): SFTTrainer does not keep TRL's masking"
    )
    trainer.train_dataset = trainer.train_dataset.remove_columns("labels")
    with pytest.raises(TunectlError, match="lost the marks of what trains: it would train on every token"):
        train.check_loss_tokens(trainer, "assistant", ds)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_the_loss_token_check_holds_for_padded_and_padding_free_batches_and_catches_moved_marks(
    tok, tmp_path, padding_free
):
    """Unsloth turns TRL's padding-free batching on by itself on a GPU, where TRL's collator sets the label of every
    row's first token to -100 (it would be predicted from the row before): the check compares the positions the loss
    can reach, so padded and padding-free batches of the same rows pass with the same count, on conversations
    (answers only) and on every token; a collator that drops the marks, moves them by one token, or leaves a row
    start of a padding-free sequence on the loss fails, naming the rows."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunectl_jobs import chat, train
    from tunectl_jobs.models import base_model_path

    talks = [
        TALK,
        TALK[:2],
        [{"role": "user", "content": "天为什么是蓝的"}, {"role": "assistant", "content": "因为散射。"}],
    ]
    text = chat.template_for(RECIPE.data, tok, RECIPE.model.name)
    model = AutoModelForCausalLM.from_pretrained(base_model_path(RECIPE.model.name))
    counts = {}
    for loss_on in ("assistant", "all"):
        data = RECIPE.data.model_copy(update={"train_on": loss_on})
        rows = datasets.Dataset.from_list([{"messages": t} for t in talks])
        ds, _ = chat.tokenized_dataset(rows, data, tok, text, [2], 512)
        args = SFTConfig(output_dir=str(tmp_path), max_length=None if padding_free else 512, report_to="none",
                         use_cpu=True, max_steps=1, padding_free=padding_free)  # fmt: skip
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        assert ("position_ids" in batch and batch["input_ids"].shape[0] == 1) == padding_free
        lengths = [len(r["input_ids"]) for r in ds]
        marked = sum(sum(m) for m in ds["assistant_masks"]) if loss_on == "assistant" else sum(lengths) - 3
        counts[loss_on] = train.check_loss_tokens(trainer, loss_on, ds)
        assert counts[loss_on] == {"loss_tokens_checked": marked, "tokens_checked": sum(lengths)}
        collate = trainer.data_collator

        def broken(how, collate=collate):
            def collator(batch_rows):
                out = collate(batch_rows)
                labels = out["labels"]
                if how == "drop":
                    out["labels"] = out["input_ids"].clone()
                elif how == "shift":  # the same count, one token later
                    out["labels"] = torch.roll(labels, 1, dims=-1)
                elif how == "row starts":
                    out["labels"] = torch.where(out["position_ids"] == 0, out["input_ids"], labels)
                return out

            return collator

        hows = ["drop", "shift"] if loss_on == "assistant" else ["row starts"] if padding_free else []
        for how in hows:
            trainer.data_collator = broken(how)
            with pytest.raises(TunectlError) as e:
                train.check_loss_tokens(trainer, loss_on, ds)
            # a padding-free sequence's first token is shifted out: only the later rows' starts reach the loss
            first = "row 1 " if how == "row starts" else "row 0 "
            assert str(e.value).startswith("the trainer would put the loss on "), str(e.value)
            assert f"marks {marked} ({first}" in str(e.value), (how, str(e.value))
            assert str(e.value).endswith("SFTTrainer does not keep TRL's masking")
        trainer.data_collator = collate
    assert counts["assistant"]["loss_tokens_checked"] < counts["all"]["loss_tokens_checked"]


def test_the_loss_token_check_reads_packed_rows_by_their_sequences(tok, tmp_path):
    """training.packing: TRL packs the conversations best-fit into one row with their seq_lengths and masks each
    sequence's first token; the check leaves those starts out (5 conversations of 42 tokens: 205 of 210 on every
    token) and fails a collator that trains them."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunectl_jobs import chat, train
    from tunectl_jobs.models import base_model_path

    model = AutoModelForCausalLM.from_pretrained(base_model_path(RECIPE.model.name))
    text = chat.template_for(RECIPE.data, tok, RECIPE.model.name)
    for loss_on in ("assistant", "all"):
        data = RECIPE.data.model_copy(update={"train_on": loss_on})
        rows = datasets.Dataset.from_list([{"messages": TALK[:2]}] * 5)
        ds, _ = chat.tokenized_dataset(rows, data, tok, text, [2], 512)
        args = SFTConfig(output_dir=str(tmp_path), max_length=512, report_to="none", use_cpu=True, max_steps=1,
                         packing=True)  # fmt: skip
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
        assert len(trainer.train_dataset) == 1 and len(trainer.train_dataset[0]["seq_lengths"]) == 5
        n = len(ds[0]["input_ids"])
        want = 5 * sum(ds[0]["assistant_masks"]) if loss_on == "assistant" else 5 * (n - 1)
        assert train.check_loss_tokens(trainer, loss_on, ds) == {"loss_tokens_checked": want, "tokens_checked": 5 * n}
    collate = trainer.data_collator

    def starts_trained(rows):
        out = collate(rows)
        out["labels"] = torch.where(out["position_ids"] == 0, out["input_ids"], out["labels"])
        return out

    trainer.data_collator = starts_trained
    with pytest.raises(TunectlError, match=rf"on {want + 4} tokens of its first 1 rows where data.train_on all marks "
                                           rf"{want} \(row 0 {want + 4} not {want}\)"):  # fmt: skip
        train.check_loss_tokens(trainer, "all", ds)


def test_alpaca_rows_with_the_loss_on_the_response_train_only_the_response_and_eos(tmp_path):
    """data.train_on assistant for Alpaca: prompt and completion columns, and TRL's completion-only loss."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunectl_jobs import data, train
    from tunectl_jobs.models import base_model_path

    recipe = load_recipe("ruozhiba-tiny", ["data.train_on=assistant"])
    path = base_model_path(recipe.model.name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.eos_token = "<|im_end|>"  # as the train stage's token contract corrects it (the GGUF reader names <|im_start|>)
    rows = datasets.Dataset.from_list([{"instruction": "请用中文回答", "input": "一加一", "output": "等于二。"}])
    ds = data.format_prompt_completion(rows, recipe.data, "<|im_end|>")
    assert (
        ds[0]["prompt"] == recipe.prompt_for("请用中文回答", "一加一") and ds[0]["completion"] == "等于二。<|im_end|>"
    )
    args = SFTConfig(output_dir=str(tmp_path), max_length=512, report_to="none", use_cpu=True, max_steps=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
    labels = trainer.data_collator([trainer.train_dataset[0]])["labels"][0].tolist()
    assert tok.decode([t for t in labels if t != -100]) == "等于二。<|im_end|>"
    assert train.check_loss_tokens(trainer, "assistant", ds)["loss_tokens_checked"] == len(
        tok("等于二。<|im_end|>")["input_ids"]
    )


@pytest.mark.parametrize("template", ["model", "chatml"])
def test_the_ollama_template_renders_every_conversation_as_the_trained_template_does(tok, tmp_path, template):
    """For the ChatML family (the tiny model's own template, with its default system message, and tunectl's), the
    Go TEMPLATE and the Jinja template render the same text for multi-turn conversations with and without a
    system message; Go's own text/template renders it."""
    from gotemplate import go_render

    from tunectl_jobs import chat

    jinja = chat.template_for(load_recipe("ruozhiba-chat-tiny", [f"data.chat_template={template}"]).data, tok, "m")
    go_template, why = chat.ollama_template(tok, jinja)
    assert why is None and go_template is not None
    talks = [
        *chat._probes(),
        [{"role": "system", "content": "回答要简短、有礼貌。"}, *TALK, {"role": "user", "content": "那再减三呢？"}],
    ]
    expected = [tok.apply_chat_template(t, chat_template=jinja, tokenize=False, add_generation_prompt=True)
                for t in talks]  # fmt: skip
    cases = [{"Messages": [{"Role": m["role"], "Content": m["content"]} for m in t]} for t in talks]
    assert go_render(tmp_path, go_template, cases) == expected


def test_a_template_outside_the_chatml_family_gets_no_ollama_template_and_says_why(tok):
    from tunectl_jobs import chat

    llama3 = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    assert chat.ollama_template(tok, llama3) == (
        None, "it is not ChatML (<|im_start|>ROLE ... <|im_end|>), the family tunectl writes for Ollama",
    )  # fmt: skip
    # ChatML that drops the system message: the start matches, a probe with a system message does not.
    no_system = chat.CHATML.replace(
        "{%- for message in messages -%}", "{%- for message in messages if message['role'] != 'system' -%}"
    )
    assert chat.ollama_template(tok, no_system)[1] == (
        "it renders some conversations differently from ChatML (e.g. with a system message)"
    )
