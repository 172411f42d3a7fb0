"""Recipes: what to fine-tune, on which data, with which hyperparameters, and what to export.

A recipe is YAML validated by the schema below. Unknown keys are errors that name the key, so a typo can
never silently fall back to a default. A recipe may `extends:` another (built-in name or file) and
override only what differs; `--set a.b=value` overrides any field after that.
"""

from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import yamlsafe
from .errors import ConfigError

# The Alpaca prompt (instruction / input / response). The response slot is last so the text before it
# is exactly the prompt a served model sees.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n{output}"
)

GGUF_TYPES = (
    "f16",
    "bf16",
    "f32",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q4_k_m",
    "q4_k_s",
    "q5_k_m",
    "q5_k_s",
    "q6_k",
    "q3_k_m",
    "q2_k",
)
OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd")


class _Strict(BaseModel):
    # Unknown keys are errors; numbers are finite (`.inf` / `.nan` are valid YAML floats).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Counts and sizes: strict, so YAML's `true` is not the number 1 and `3.7` is not silently 3.
Count = Annotated[int, Field(strict=True)]
SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers' set_seed passes the seed to


class ModelSpec(_Strict):
    name: str = Field(description="Hub id, local directory, local .gguf file, or package:<module>/<file>")
    max_seq_length: Count = Field(2048, gt=0, le=1 << 20)
    load_in_4bit: bool = Field(True, description="QLoRA: load the base in 4-bit (needs CUDA)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    merge_base: str | None = Field(
        None, description="16-bit weights the adapter is merged onto; default: name without its -bnb-4bit suffix"
    )

    def merge_base_name(self) -> str:
        if self.merge_base:
            return self.merge_base
        return self.name[: -len("-bnb-4bit")] if self.name.endswith("-bnb-4bit") else self.name


PROMPT_FIELDS = ("instruction", "input", "output")


def check_prompt_template(template: str) -> None:
    """The template is read the way `str.format` reads it, and every place that renders it (training text,
    inference prompt, Jinja chat template, Ollama TEMPLATE) splits it the same way: so it may hold exactly the
    three plain fields, each once, `{output}` last. Attribute access, indexes, conversions and format specs
    would make the served prompt differ from the trained one. Literal braces are written `{{` and `}}`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"is not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    seen: list[str] = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if field not in PROMPT_FIELDS:
            raise ValueError(
                f"has the placeholder {shown}: only {{instruction}}, {{input}} and {{output}} are allowed "
                "(write a literal brace as {{ or }})"
            )
        if spec or conversion:
            raise ValueError(f"has {shown}: placeholders take no conversion or format, write {{{field}}}")
        if field in seen:
            raise ValueError(f"has {{{field}}} twice: each placeholder appears once")
        seen.append(field)
    for name in PROMPT_FIELDS:
        if name not in seen:
            raise ValueError(f"must contain the placeholder {{{name}}}")
    if parsed[-1][1] != "output":
        raise ValueError("must end with {output}, so the text before it is the inference prompt")
    if '"""' in template:
        raise ValueError('contains """, which an Ollama Modelfile cannot quote')
    if "\x00" in template:
        raise ValueError("contains a NUL character")


class Columns(_Strict):
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"


CHAT_ROLES = ("system", "user", "assistant")
ChatRole = Literal["system", "user", "assistant"]
# Each chat format's defaults: the column holding the turns, the keys of a turn, and role names besides the three.
CHAT_FORMATS: dict[str, tuple[str, str, str, dict[str, ChatRole]]] = {
    "messages": ("messages", "role", "content", {}),
    "sharegpt": ("conversations", "from", "value", {"human": "user", "gpt": "assistant"}),
}


class Conversation(_Strict):
    """Where a chat row (data.format messages or sharegpt) keeps its turns; an empty field takes the format's
    default (messages: column `messages`, keys `role` and `content`; sharegpt: `conversations`, `from` and `value`,
    with `human` and `gpt` for user and assistant). `roles` names more roles, e.g. {bot: assistant}."""

    column: str = ""
    role_key: str = ""
    content_key: str = ""
    roles: dict[str, ChatRole] = Field(default_factory=dict)


@dataclass(frozen=True)
class Turns:
    """A chat format's conversation layout, defaults filled in."""

    column: str
    role_key: str
    content_key: str
    roles: dict[str, str]  # a role as the data names it -> system, user or assistant


class DataSpec(_Strict):
    source: str = Field(description="Hub data set id, or a local .json/.jsonl/.parquet/.csv file")
    split: str = "train"
    format: Literal["alpaca", "messages", "sharegpt"] = Field(
        "alpaca", description="alpaca: instruction/input/output; messages or sharegpt: a conversation per row"
    )
    prompt_template: str = ALPACA_TEMPLATE
    columns: Columns = Columns()
    conversation: Conversation = Conversation()
    train_on: Literal["all", "assistant"] | None = Field(
        None,
        description="which tokens the loss is on: all, or the assistant's turns (Alpaca: the response); "
        "default: assistant for chat formats, all for alpaca",
    )
    chat_template: str = Field(
        "model",
        description="chat formats: the template conversations are rendered with: model (the base tokenizer's), "
        "chatml, or a Jinja template",
    )
    add_eos: bool = Field(True, description="append the EOS token so the model learns to stop")
    max_rows: Count | None = Field(None, gt=0)
    # Held-out evaluation: eval_rows takes that many rows out of training (chosen with training.seed, the same rows
    # every time); eval_split reads a split of the Hub data set instead. The train stage measures their loss and
    # perplexity before, during (training.eval_steps) and after training, and the gguf stage each GGUF's fidelity.
    eval_rows: Count | None = Field(None, gt=0)
    eval_split: str | None = None
    too_long: Literal["error", "drop", "cut_prompt"] = Field(
        "error",
        description="rows longer than model.max_seq_length tokens: refuse the data set, drop them, or shorten "
        "their prompt (input, then instruction) so the response and EOS stay whole",
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_slots(cls, v: str) -> str:
        check_prompt_template(v)
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str) -> str:
        if v not in ("model", "chatml") and "{{" not in v and "{%" not in v:
            raise ValueError(f"{v[:60]!r} is not model, chatml or a Jinja template")
        return v

    @model_validator(mode="after")
    def _format_fields(self) -> DataSpec:
        """A setting of one format is refused with the other, so it never goes silently unused."""
        if self.is_chat:
            alpaca = {"prompt_template": self.prompt_template != ALPACA_TEMPLATE, "columns": self.columns != Columns(),
                      "add_eos": not self.add_eos}  # fmt: skip
            if any(alpaca.values()):
                raise ValueError(
                    f"{next(k for k, v in alpaca.items() if v)} is for data.format alpaca; a {self.format} "
                    "conversation is rendered with data.chat_template, whose end-of-turn token the model learns to "
                    "stop at"
                )
            if self.too_long == "cut_prompt":
                raise ValueError("too_long cut_prompt is for data.format alpaca; use error or drop")
            if self.turns.role_key == self.turns.content_key:
                raise ValueError(f"conversation.role_key and .content_key both name '{self.turns.role_key}'")
        else:
            chat = {"conversation": self.conversation != Conversation(), "chat_template": self.chat_template != "model"}
            if any(chat.values()):
                raise ValueError(
                    f"{next(k for k, v in chat.items() if v)} is for data.format messages or sharegpt, not alpaca"
                )
        return self

    @model_validator(mode="after")
    def _eval_fields(self) -> DataSpec:
        if self.eval_rows is not None and self.eval_split is not None:
            raise ValueError("eval_rows and eval_split both hold out rows: set one")
        if self.eval_split is not None and self.eval_split == self.split:
            raise ValueError(f"eval_split '{self.eval_split}' is the training split: name another, or use eval_rows")
        return self

    @property
    def is_chat(self) -> bool:
        return self.format in CHAT_FORMATS

    @property
    def loss_on(self) -> Literal["all", "assistant"]:
        """train_on, or its default for the format."""
        return self.train_on or ("assistant" if self.is_chat else "all")

    @property
    def turns(self) -> Turns:
        column, role_key, content_key, extra = CHAT_FORMATS.get(self.format, CHAT_FORMATS["messages"])
        c = self.conversation
        roles = {**{r: r for r in CHAT_ROLES}, **extra, **c.roles}
        return Turns(c.column or column, c.role_key or role_key, c.content_key or content_key, roles)


class LoraSpec(_Strict):
    r: Count = Field(16, gt=0, le=4096)
    alpha: Count = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    use_gradient_checkpointing: Union[Literal["unsloth"], bool] = "unsloth"  # noqa: UP007
    random_state: Count = Field(3407, ge=0, le=SEED_MAX)
    use_rslora: bool = False
    loftq_config: dict[str, Any] | None = None


class TrainingSpec(_Strict):
    per_device_train_batch_size: Count = Field(1, gt=0, le=4096)
    gradient_accumulation_steps: Count = Field(4, gt=0, le=65536)
    warmup_steps: Count = Field(5, ge=0)
    max_steps: Count = Field(60, gt=0, le=10_000_000)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    optim: Literal[OPTIMIZERS] = "adamw_8bit"  # type: ignore[valid-type]
    weight_decay: float = Field(0.01, ge=0, le=1)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    seed: Count = Field(3407, ge=0, le=SEED_MAX)
    logging_steps: Count = Field(1, gt=0)
    packing: bool = False
    # Checkpoints in the store, from which a retried or resumed train stage goes on (one is also saved on SIGTERM):
    # every `save_steps` optimizer steps (0: not by steps) and whenever `save_minutes` of training passed since the
    # last one (0: not by time); the newest `keep_checkpoints` are kept.
    save_steps: Count = Field(0, ge=0)
    save_minutes: float = Field(10.0, ge=0, le=10080)
    keep_checkpoints: Count = Field(2, gt=0, le=100)
    # Answer the test prompts before and after training (the train stage's "generate before/after" phases, kept in
    # generations.json); false skips both and saves their minutes.
    sample_answers: bool = True
    # Measure the held-out rows (data.eval_rows or eval_split) every eval_steps optimizer steps as well as before and
    # after training.
    eval_steps: Count | None = Field(None, gt=0)
    # Data parallel training (torch.distributed, started by torchrun): processes per node (one per GPU; on a CPU,
    # gloo processes) and nodes (Kubernetes: one pod per node). Each process trains on its share of every batch.
    nproc_per_node: Count = Field(1, gt=0, le=64)
    nnodes: Count = Field(1, gt=0, le=1024)
    # The rows per optimizer step that the recipe expects (per-device batch x gradient accumulation x processes);
    # when set, a recipe whose numbers give another value is refused, so a change of GPU count cannot change the
    # training silently.
    global_batch_size: Count | None = Field(None, gt=0)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    @model_validator(mode="after")
    def _global_batch(self) -> TrainingSpec:
        want = self.global_batch_size
        if want is not None and want != self.effective_batch_size:
            per_step = self.per_device_train_batch_size * self.world_size
            fix = (
                f"set gradient_accumulation_steps: {want // per_step}"
                if want % per_step == 0
                else f"it is not a multiple of per_device_train_batch_size x processes ({per_step})"
            )
            raise ValueError(
                f"global_batch_size {want} != per_device_train_batch_size {self.per_device_train_batch_size} x "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} x processes {self.world_size} "
                f"(nproc_per_node {self.nproc_per_node} x nnodes {self.nnodes}) = {self.effective_batch_size}: {fix}"
            )
        return self


class ExportSpec(_Strict):
    lora: bool = True
    merged_16bit: bool = True
    merged_4bit: bool = Field(False, description="lower fidelity than GGUF q4_k_m; only on request")
    merge_onto_4bit: bool = Field(False, description="allow merging onto a 4-bit base's de-quantized weights")
    gguf: list[Literal[GGUF_TYPES]] = Field(default_factory=lambda: ["q4_k_m", "q8_0", "f16"])  # type: ignore[valid-type]
    # Each GGUF answers the first test prompt in llama.cpp. stop: it must answer and stop at EOS within the token
    # limit (a model that never stops is a failed export); answer: a non-empty answer passes even at the limit (for a
    # stand-in model that cannot have learned to stop; smoke.json says so); off: no smoke test.
    smoke_test: Literal["stop", "answer", "off"] = "stop"
    # Each GGUF's fidelity to the f16 GGUF, measured with llama.cpp on up to this many tokens of the held-out rows
    # (of the first training rows without them): perplexity, KL divergence of the next-token distribution, top-1
    # agreement. 0: not measured. Its time grows with the model and the token count.
    fidelity_tokens: Count = Field(2048, ge=0, le=1_000_000)
    # Fail the export when a GGUF's mean KL divergence from f16 is above this.
    max_kld: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _gguf_needs_merged(self) -> ExportSpec:
        if self.gguf and not self.merged_16bit:
            raise ValueError("gguf export converts the merged 16-bit model: set merged_16bit: true or gguf: []")
        if self.max_kld is not None and not self.fidelity_tokens:
            raise ValueError("max_kld needs the fidelity measured: fidelity_tokens is 0")
        return self


class TestPrompt(_Strict):
    """A prompt the train stage answers before and after training, and the gguf stage's smoke test. Chat formats:
    `instruction` is the user's message, after an optional `system` one."""

    instruction: str
    input: str = ""
    system: str = ""
    max_new_tokens: Count = Field(128, gt=0, le=32768)

    def messages(self) -> list[dict[str, str]]:
        """The prompt as a chat format's conversation so far."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.instruction}]


class Recipe(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    description: str = ""
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    export: ExportSpec = ExportSpec()
    test_prompts: list[TestPrompt] = Field(default_factory=list)

    @model_validator(mode="after")
    def _test_prompt_fields(self) -> Recipe:
        for i, p in enumerate(self.test_prompts):
            if self.data.is_chat and p.input:
                raise ValueError(
                    f"test_prompts[{i}].input is for data.format alpaca; with {self.data.format} the user's message "
                    "goes in instruction (and a system message in system)"
                )
            if not self.data.is_chat and p.system:
                raise ValueError(f"test_prompts[{i}].system is for data.format messages or sharegpt, not alpaca")
        return self

    @model_validator(mode="after")
    def _eval_steps_need_rows(self) -> Recipe:
        if self.training.eval_steps and self.data.eval_rows is None and self.data.eval_split is None:
            raise ValueError("training.eval_steps needs held-out rows: set data.eval_rows or data.eval_split")
        return self

    def prompt_for(self, instruction: str, input: str = "") -> str:
        """The inference prompt: the training template with an empty response."""
        return self.data.prompt_template.format(instruction=instruction, input=input, output="")

    def to_yaml(self) -> str:
        return _dump(self.model_dump(mode="json"))

    def show_yaml(self) -> str:
        """The recipe as a person reads it: the data format's defaults filled in and the other format's settings
        left out (to_yaml keeps every field: it is what a run records and checksums)."""
        doc = self.model_dump(mode="json")
        data = doc["data"]
        data["train_on"] = self.data.loss_on
        if self.data.is_chat:
            for key in ("prompt_template", "columns", "add_eos"):
                del data[key]
            t = self.data.turns
            renamed = {name: role for name, role in t.roles.items() if name != role}
            data["conversation"] = {"column": t.column, "role_key": t.role_key, "content_key": t.content_key,
                                    "roles": renamed}  # fmt: skip
        else:
            del data["conversation"], data["chat_template"]
        unused = "input" if self.data.is_chat else "system"
        for prompt in doc["test_prompts"]:
            del prompt[unused]
        return _dump(doc)


def _dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=110)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the prompt template) as literal blocks, so they read as they are."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


# --- loading -----------------------------------------------------------------------------------------


def builtin_dir() -> Path:
    return Path(str(resources.files("tunectl") / "recipes"))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


_BUILTIN_NAME = re.compile(r"^[a-z0-9][-a-z0-9]*$")


def _locate(ref: str) -> Path:
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {ref} does not exist")
        return path
    # Only a plain name is looked up among the built-ins: `../x` must not reach files beside them.
    builtin = builtin_dir() / f"{ref}.yaml"
    if _BUILTIN_NAME.match(ref) and builtin.is_file():
        return builtin
    raise ConfigError(
        f"unknown recipe '{ref}': built-in recipes are {', '.join(builtin_names())}, or pass a path to a YAML file"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    doc = yamlsafe.read(path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    return doc


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw(ref: str, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = _locate(ref).resolve()
    if path in seen:
        raise ConfigError(f"recipe {path} extends itself (cycle through {', '.join(map(str, seen))})")
    doc = _read_yaml(path)
    parent = doc.pop("extends", None)
    if parent is None:
        return doc
    # A relative parent path is relative to the file that names it.
    parent_ref = str(parent)
    if (path.parent / parent_ref).is_file():
        parent_ref = str(path.parent / parent_ref)
    base = _raw(parent_ref, seen + (path,))
    base.pop("name", None)
    base.pop("description", None)
    return _deep_merge(base, doc)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], parsed value). Values are YAML scalars or flow lists."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected KEY=VALUE, for example --set training.max_steps=30")
    path = key.strip().split(".")
    if any(not p.strip() for p in path):
        raise ConfigError(f"--set {item}: '{key}' has an empty part; write KEY.SUBKEY=VALUE")
    try:
        value = yamlsafe.load(text, f"--set {key}") if text.strip() else ""
    except yamlsafe.RefusedYAML:
        raise
    except ConfigError:
        value = text  # not YAML: a plain string (a template with ': ' in it, say)
    return [p.strip() for p in path], value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    doc = _deep_merge(doc, {})
    for item in overrides:
        path, value = parse_override(item)
        node = doc
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {item}: '{part}' is not a section")
                node[part] = child
            node = child
        last, old = path[-1], node.get(path[-1])
        # A mapping merges into the section it names (`--set training={max_steps: 3}` changes one field, not
        # the whole section back to defaults), as `extends:` does.
        node[last] = _deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return doc


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    """The valid field names at the model that holds `loc`'s last element."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in (ann, *inner) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return []
        model = nxt
    return list(model.model_fields)


def _explain(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _field_names(loc)
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        tail = f"; did you mean '{hint[0]}'?" if hint else (f"; valid keys: {', '.join(known)}" if known else "")
        msg = f"unknown key '{where}'{tail}"
    elif err["type"] == "missing":
        msg = f"'{where}' is required"
    else:
        got = err.get("input")
        shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
        text = err["msg"].removeprefix("Value error, ")  # our own validators' messages read as they are
        msg = (
            f"'{where}': " if loc else ""
        ) + f"{text[0].lower()}{text[1:]}{shown}"  # a whole-recipe check: its own words
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"recipe {source}: {msg}{more}"


def load_recipe(ref: str, overrides: list[str] | None = None) -> Recipe:
    """Resolve a built-in name or a YAML path, apply --set overrides, validate."""
    doc = apply_overrides(_raw(ref), overrides or [])
    try:
        return Recipe.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_explain(e, ref)) from None


def recipe_from_file(path: str | Path) -> Recipe:
    """A resolved recipe as written by `tunectl` for a stage (no extends, no overrides)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file {p} does not exist")
    try:
        return Recipe.model_validate(_read_yaml(p))
    except ValidationError as e:
        raise ConfigError(_explain(e, str(p))) from None
