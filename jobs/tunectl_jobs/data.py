"""Loading the training data with `datasets` and formatting it as Alpaca prompt + response + EOS.

Rows are checked by tunectl.datacheck (the same rules the submit-time preflight applies), then measured in
tokens as the trainer will see them: a row longer than `model.max_seq_length` would be cut at its end, losing
the EOS the model must learn, so `data.too_long` decides: refuse the data set, drop such rows, or shorten
their prompt so the response and EOS stay whole.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from tunectl.datacheck import (
    BUILDERS,
    check_columns,
    check_eval_rows,
    check_rows,
    peek_local_file,
    row_label,
    suffix_of,
    used_columns,
)
from tunectl.errors import ConfigError
from tunectl.recipe import DataSpec
from tunectl.refs import resolve


def load(spec: DataSpec) -> Any:
    """A `datasets.Dataset` with the Alpaca columns and every row checked; Hub ids and local files alike."""
    return load_rows(spec)[0]


def load_rows(spec: DataSpec) -> tuple[Any, list[int] | None]:
    """The checked data set, and each row's line in the file where known (JSONL, CSV), for messages."""
    import datasets

    ref = resolve(spec.source, "data set")
    lines: list[int] | None = None
    try:
        if ref.path is not None:
            suffix = suffix_of(ref.path, spec.source)
            # The preflight's check again (a Kubernetes run has had none). The JSON, JSONL and CSV rows it read
            # are the ones that train: pandas would make the CSV cell "1.50" the number 1.5 and "NA" a null, and
            # pyarrow fails on a column of mixed types the recipe does not even use.
            local = peek_local_file(ref.path, spec, spec.source)
            if local is not None and local.rows is not None:
                ds, lines = datasets.Dataset.from_list(local.rows), local.lines
            else:
                ds = datasets.load_dataset(BUILDERS[suffix], data_files={spec.split: str(ref.path)}, split=spec.split)
        else:
            ds = datasets.load_dataset(ref.hub_id, split=spec.split)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:
        if "corresponds to no data" in str(e):  # datasets' way of saying the split came out empty
            raise ConfigError(f"data set {spec.source} has no rows") from None
        raise ConfigError(f"data set {spec.source}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # datasets wraps JSON/Arrow parse errors in several types
        if type(e).__name__ in ("DatasetGenerationError", "ArrowInvalid", "DatasetNotFoundError"):
            raise ConfigError(f"data set {spec.source}: cannot be read ({str(e).splitlines()[0]})") from None
        raise
    check_columns(list(ds.column_names), len(ds), spec, spec.source)
    if spec.max_rows is not None:
        ds = ds.select(range(min(spec.max_rows, len(ds))))
    # Checked as loaded, which is what trains (a Hub data set or a Parquet file's types are seen here first).
    check_rows(_rows(ds, spec), spec, spec.source, lines)
    return ds, lines


def hold_out(
    ds: Any, spec: DataSpec, seed: int, lines: list[int] | None
) -> tuple[Any, Any | None, list[int] | None, list[int] | None]:
    """The rows to train on and the held-out rows (None without data.eval_rows or eval_split), each with its lines.
    eval_rows picks its rows with the seed from Python's own generator, so the same recipe holds out the same rows
    whatever the library versions; eval_split loads that split of the Hub data set, checked as the training rows."""
    if spec.eval_rows is None and spec.eval_split is None:
        return ds, None, lines, None
    if spec.eval_split is not None and resolve(spec.source, "data set").hub_id is not None:
        held = load_rows(spec.model_copy(update={"split": spec.eval_split, "eval_split": None, "max_rows": None}))
        return ds, held[0], lines, None
    check_eval_rows(len(ds), spec, spec.source)  # one line for a local file's eval_split, or too few rows
    assert spec.eval_rows is not None
    held = sorted(random.Random(seed).sample(range(len(ds)), spec.eval_rows))
    kept = sorted(set(range(len(ds))) - set(held))
    pick = (lambda idx: [lines[i] for i in idx]) if lines is not None else (lambda idx: None)
    return ds.select(kept), ds.select(held), pick(kept), pick(held)


def lineage(spec: DataSpec, ds: Any) -> dict[str, str]:
    """What identifies the data trained on: a local file's sha256, or the fingerprint `datasets` gave the Hub data
    set it loaded (its cache key, derived from the files it downloaded)."""
    ref = resolve(spec.source, "data set")
    if ref.path is not None:
        from tunectl.stores.manifest import sha256_file

        return {"data_sha256": sha256_file(ref.path)}
    return {"data_fingerprint": str(getattr(ds, "_fingerprint", "unknown"))}


def _rows(ds: Any, spec: DataSpec) -> Iterator[dict[str, Any]]:
    names = [n for n in used_columns(spec) if n in ds.column_names]
    for batch in ds.select_columns(names).iter(batch_size=1000):
        yield from (dict(zip(names, values, strict=True)) for values in zip(*(batch[n] for n in names), strict=True))


def _text(spec: DataSpec, instruction: str | None, input: str | None, output: str | None, eos_token: str) -> str:
    suffix = eos_token if spec.add_eos else ""
    return spec.prompt_template.format(instruction=instruction or "", input=input or "", output=output or "") + suffix


def format_alpaca(ds: Any, spec: DataSpec, eos_token: str) -> Any:
    """Add a `text` column: the prompt template filled in, with EOS so the model learns to stop."""
    cols = spec.columns
    has_input = cols.input in ds.column_names

    def fmt(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
        n = len(batch[cols.instruction])
        inputs = batch[cols.input] if has_input else [""] * n
        return {
            "text": [
                _text(spec, i, x, o, eos_token)
                for i, x, o in zip(batch[cols.instruction], inputs, batch[cols.output], strict=True)
            ]
        }

    return ds.map(fmt, batched=True, remove_columns=ds.column_names)


def format_prompt_completion(ds: Any, spec: DataSpec, eos_token: str) -> Any:
    """Alpaca rows as `prompt` (the template up to its response) and `completion` (the response, with EOS): TRL's
    SFTTrainer then puts the loss on the completion only (data.train_on assistant)."""
    cols = spec.columns
    has_input = cols.input in ds.column_names
    suffix = eos_token if spec.add_eos else ""

    def fmt(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
        n = len(batch[cols.instruction])
        inputs = batch[cols.input] if has_input else [""] * n
        prompts = [spec.prompt_template.format(instruction=i or "", input=x or "", output="")
                   for i, x in zip(batch[cols.instruction], inputs, strict=True)]  # fmt: skip
        return {"prompt": prompts, "completion": [(o or "") + suffix for o in batch[cols.output]]}

    return ds.map(fmt, batched=True, remove_columns=ds.column_names)


def token_lengths(tokenizer: Any, texts: list[str], eos_token: str) -> list[int]:
    """Each text's length in tokens as TRL's SFTTrainer counts it: EOS appended where missing, then the
    tokenizer's plain call (with its own special tokens, e.g. a BOS), and truncation at max_length after."""
    out: list[int] = []
    for start in range(0, len(texts), 1000):
        chunk = [t if t.endswith(eos_token) else t + eos_token for t in texts[start : start + 1000]]
        out.extend(len(ids) for ids in tokenizer(chunk)["input_ids"])
    return out


def fit_to_length(
    ds: Any, spec: DataSpec, tokenizer: Any, eos_token: str, max_length: int, lines: list[int] | None = None
) -> tuple[Any, dict[str, int]]:
    """Apply `data.too_long` to the rows longer than `max_length` tokens; returns the rows to train on and
    counts for the manifest (rows_trained, rows_too_long, rows_dropped, rows_prompt_cut, longest_row_tokens)."""
    lengths = token_lengths(tokenizer, format_alpaca(ds, spec, eos_token)["text"], eos_token)
    over = [i for i, n in enumerate(lengths) if n > max_length]
    counts = {
        "rows_trained": len(ds),
        "rows_too_long": len(over),
        "rows_dropped": 0,
        "rows_prompt_cut": 0,
        "longest_row_tokens": max(lengths, default=0),
    }
    if not over:
        return ds, counts
    first = over[0]
    what = (
        f"data set {spec.source}: {len(over)} of {len(ds)} rows are longer than model.max_seq_length "
        f"({max_length} tokens; first: {row_label(first, lines)} with {lengths[first]})"
    )
    if spec.too_long == "error":
        raise ConfigError(
            f"{what}; training would cut off their ends and EOS: raise model.max_seq_length, or set "
            "data.too_long to drop or cut_prompt"
        )
    if spec.too_long == "drop":
        dropped = set(over)
        if len(dropped) == len(ds):
            raise ConfigError(f"{what}: dropping them leaves no rows; raise model.max_seq_length")
        counts["rows_dropped"] = len(over)
        counts["rows_trained"] = len(ds) - len(over)
        return ds.select([i for i in range(len(ds)) if i not in dropped]), counts

    cols = spec.columns
    has_input = cols.input in ds.column_names
    cut: dict[int, dict[str, str]] = {}
    unfit: list[int] = []
    for i in over:
        row = ds[i]
        fields = _cut_prompt(
            spec,
            row[cols.instruction],
            row[cols.input] if has_input else "",
            row[cols.output],
            eos_token,
            max_length,
            lambda text: token_lengths(tokenizer, [text], eos_token)[0],
        )
        if fields is None:
            unfit.append(i)
        else:
            cut[i] = {cols.instruction: fields[0], **({cols.input: fields[1]} if has_input else {})}
    if unfit:
        raise ConfigError(
            f"data set {spec.source}: {len(unfit)} rows do not fit in model.max_seq_length ({max_length} tokens) "
            f"even with their prompt cut (first: {row_label(unfit[0], lines)} with {lengths[unfit[0]]}): raise "
            "model.max_seq_length, or set data.too_long=drop"
        )
    keys = [cols.instruction] + ([cols.input] if has_input else [])
    counts["rows_prompt_cut"] = len(cut)
    return ds.map(lambda row, i: cut.get(i) or {k: row[k] for k in keys}, with_indices=True), counts


def _cut_prompt(
    spec: DataSpec,
    instruction: str,
    input: str | None,
    output: str,
    eos_token: str,
    max_length: int,
    count: Callable[[str], int],
) -> tuple[str, str] | None:
    """The longest start of the input, then of the instruction (at least one character of it), with which
    the row fits; None when even that is too long. Cut by characters, so no character is split in two."""

    def fits(i: str, x: str) -> bool:
        return count(_text(spec, i, x, output, eos_token)) <= max_length

    if input and fits(instruction, ""):
        return instruction, input[: _longest_prefix(input, lambda x: fits(instruction, x))]
    if not fits(instruction[:1], ""):
        return None
    return instruction[: _longest_prefix(instruction, lambda i: fits(i, ""), shortest=1)], ""


def _longest_prefix(text: str, ok: Callable[[str], bool], shortest: int = 0) -> int:
    """The largest k with ok(text[:k]), given ok(text[:shortest]) and not ok(text) (binary search)."""
    lo, hi = shortest, len(text)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(text[:mid]):
            lo = mid
        else:
            hi = mid
    return lo
