"""Checks on a data set, shared by the submit-time preflight and the train stage.

The rules are the same in both places, so bad data is refused before it can train silently. Alpaca rows:
- `instruction` and `output` are text (a string: not a number, list or object) that is not blank;
- `input` may be absent, null or empty, and is text when given;
- a column named in `data.columns` must exist, except the default `input` column.
Conversations (data.format messages or sharegpt), in the column `data.conversation` names:
- a non-empty list of turns, each an object with a text role (one of system, user, assistant, or a name
  `data.conversation.roles` maps to one) and text content that is not blank;
- a system turn only first; then user and assistant take turns, starting with the user and ending with the
  assistant, whose answers are what the model learns.
Only the first `data.max_rows` rows are checked, as only they train.
Numbers are refused rather than converted: their text is ambiguous (JSON 1.50 reads back as 1.5), so the
file should say what the model is to learn, quoted. An error names the first bad row by its number (and its
line for JSONL and CSV) and counts the others. Only the standard library at import: the CLI runs this.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .recipe import DataSpec

# Local file types the train stage loads, by suffix, and the `datasets` builder for each.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("instruction", "input", "output")


def suffix_of(path: Path, source: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise ConfigError(
            f"data set {source}: unsupported file type '{path.suffix}' (use .json, .jsonl, .parquet, .csv)"
        )
    return suffix


def used_columns(spec: DataSpec) -> list[str]:
    """The columns a row of this format trains from."""
    if spec.is_chat:
        return [spec.turns.column]
    return list(dict.fromkeys(getattr(spec.columns, r) for r in ROLES))


def check_columns(found: list[str], rows: int, spec: DataSpec, source: str) -> None:
    if rows == 0:
        raise ConfigError(f"data set {source} has no rows")
    if spec.is_chat:
        column = spec.turns.column
        if column not in found:
            raise ConfigError(
                f"data set {source} has no '{column}' column (found: {', '.join(found) or 'none'}); rename it or "
                f"map it with --set data.conversation.column=<column>"
            )
        return
    cols = spec.columns
    names = [getattr(cols, role) for role in ROLES]
    for name in names:
        if names.count(name) > 1:
            roles = " and ".join(f"data.columns.{r}" for r in ROLES if getattr(cols, r) == name)
            raise ConfigError(f"data set {source}: {roles} both name the column '{name}'; map each to its own column")
    # The default input column may be absent (no inputs); one named on purpose must exist, or every input
    # would be dropped without a word.
    required = ["instruction", "output"] + (["input"] if cols.input != "input" else [])
    for role in required:
        name = getattr(cols, role)
        if name not in found:
            raise ConfigError(
                f"data set {source} has no '{name}' column (found: {', '.join(found) or 'none'}); "
                f"rename it or map it with --set data.columns.{role}=<column>"
            )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number (quote it, as the text the model should learn)"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def row_problem(row: Mapping[str, Any], spec: DataSpec) -> str | None:
    """What is wrong with one row, or None."""
    if spec.is_chat:
        return conversation_problem(row.get(spec.turns.column), spec)
    cols = spec.columns
    for role in ROLES:
        name = getattr(cols, role)
        field = f"field '{name}'" + (f" (data.columns.{role})" if name != role else "")
        value = row.get(name)
        if value is None:
            if role != "input":
                return f"{field} is missing or null"
        elif not isinstance(value, str):
            return f"{field} is {_kind(value)}, expected text"
        elif role != "input" and not value.strip():
            return f"{field} is empty"
    return None


def conversation_problem(turns: Any, spec: DataSpec) -> str | None:
    """What is wrong with one row's conversation, or None; names the turn (1-based) and its field."""
    t = spec.turns
    field = f"field '{t.column}'"
    if turns is None:
        return f"{field} is missing or null"
    if not isinstance(turns, (list, tuple)):
        return f"{field} is {_kind(turns)}, expected a list of turns"
    if not turns:
        return f"{field} has no turns"
    before = None  # the role of the turn before, as system/user/assistant
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, Mapping):
            return f"turn {n} is {_kind(turn)}, expected an object with '{t.role_key}' and '{t.content_key}'"
        name, content = turn.get(t.role_key), turn.get(t.content_key)
        if name is None:
            return f"turn {n} has no '{t.role_key}'"
        if not isinstance(name, str):
            return f"turn {n}: '{t.role_key}' is {_kind(name)}, expected text"
        role = t.roles.get(name)
        if role is None:
            known = ", ".join(t.roles)
            return (
                f"turn {n}: role '{name}' is not one of {known} (map it with --set "
                f"data.conversation.roles.{name}=user|assistant|system)"
            )
        if content is None:
            return f"turn {n} ({name}) has no '{t.content_key}'"
        if not isinstance(content, str):
            return f"turn {n} ({name}): '{t.content_key}' is {_kind(content)}, expected text"
        if not content.strip():
            return f"turn {n} ({name}) is empty"
        if role == "system" and n > 1:
            return f"turn {n} is a system turn; only the first turn may be one"
        expected = "user" if before in (None, "system", "assistant") else "assistant"
        if role != "system" and role != expected:
            where = "a conversation starts with the user" if before in (None, "system") else (
                f"it follows {'an' if before == 'assistant' else 'a'} {before} turn; user and assistant take turns"
            )  # fmt: skip
            return f"turn {n} is {role} ({name}); {where}"
        before = role
    if before != "assistant":
        return f"the last turn is {before}; a conversation ends with the assistant's answer, which is what trains"
    return None


def conversation(row: Mapping[str, Any], spec: DataSpec) -> list[dict[str, str]]:
    """A checked row's turns as system/user/assistant messages (the form chat templates take)."""
    t = spec.turns
    return [{"role": t.roles[turn[t.role_key]], "content": turn[t.content_key]} for turn in row[t.column]]


def check_eval_rows(rows: int, spec: DataSpec, source: str) -> None:
    """data.eval_rows must leave rows to train on; data.eval_split needs a Hub data set's split (a local file
    has one)."""
    if spec.eval_split is not None:
        raise ConfigError(
            f"data.eval_split '{spec.eval_split}': a local file has one split; hold rows out with data.eval_rows"
        )
    if spec.eval_rows is not None and spec.eval_rows >= rows:
        raise ConfigError(
            f"data.eval_rows {spec.eval_rows} would hold out every row of data set {source} ({rows} rows"
            f"{' after data.max_rows' if spec.max_rows is not None else ''}): lower it"
        )


def row_label(index: int, lines: Sequence[int] | None = None) -> str:
    """The 0-based row `index` as a person counts it: 'row 3', or 'row 3 (line 5)' where lines are known."""
    return f"row {index + 1}" + (f" (line {lines[index]})" if lines is not None and index < len(lines) else "")


def check_rows(rows: Iterable[Mapping[str, Any]], spec: DataSpec, source: str, lines: Sequence[int] | None) -> None:
    """Refuse the data set if any row breaks the rules; names the first bad row, counts the rest."""
    first: tuple[int, str] | None = None
    bad = 0
    for i, row in enumerate(rows):
        problem = row_problem(row, spec)
        if problem:
            bad += 1
            first = first or (i, problem)
    if first is not None:
        more = f" (and {bad - 1} more bad rows)" if bad > 1 else ""
        fix = "fix or remove the bad rows" if bad > 1 else "fix or remove the row"
        raise ConfigError(f"data set {source} {row_label(first[0], lines)}: {first[1]}{more}; {fix}")


def _text(path: Path, source: str, suffix: str) -> str:
    """The file as UTF-8 text, or one line naming the encoding problem (the train stage reads UTF-8 only)."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"data set {source}: the file is UTF-16 text; save it as UTF-8")
    if raw.startswith(b"\xef\xbb\xbf"):
        if suffix == ".json":  # datasets reads a byte-order mark in JSONL and CSV, not in a JSON document
            raise ConfigError(
                f"data set {source}: the JSON starts with a byte-order mark; save it as UTF-8 without a BOM"
            )
        raw = raw[3:]
    nul = raw.find(b"\x00")
    if nul >= 0:  # UTF-16 without a byte-order mark: text of NULs every other byte
        line = raw[:nul].count(b"\n") + 1
        raise ConfigError(f"data set {source}: NUL byte on line {line} (UTF-16 or binary?); save it as UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"data set {source}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}: Latin-1 or another "
            "legacy encoding?); save it as UTF-8"
        ) from None


def _json_object(value: Any, source: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"data set {source} {where}: {_kind(value)}, expected a JSON object (one record)")
    return value


def _jsonl_rows(text: str, source: str) -> tuple[list[dict[str, Any]], list[int]]:
    rows, lines = [], []
    # Split on \n only: str.splitlines() also splits on U+2028 and other characters JSON strings may hold.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data set {source}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
        rows.append(_json_object(value, source, f"line {n}"))
        lines.append(n)
    return rows, lines


def _json_rows(text: str, source: str) -> tuple[list[dict[str, Any]], list[int] | None]:
    if not text.strip():
        return [], None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one record per line in a .json file: datasets reads it as JSON Lines
            return _jsonl_rows(text, source)
        raise ConfigError(f"data set {source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(doc, dict):
        wrapper = next((k for k, v in doc.items() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
        if wrapper is not None:  # datasets would read the whole document as one row with a '<key>' column
            raise ConfigError(
                f"data set {source}: the records are under the key '{wrapper}'; make the file a JSON array of "
                "records, or one record per line (.jsonl)"
            )
        return [doc], None  # a single record, as datasets reads it
    if not isinstance(doc, list):
        raise ConfigError(f"data set {source}: {_kind(doc)}, expected a JSON array of records (objects)")
    return [_json_object(v, source, row_label(i)) for i, v in enumerate(doc)], None


def _csv_rows(text: str, source: str) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """Rows as the train stage reads CSV: every cell is text, a missing one is empty, blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows, lines = [], []
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines: the record starts at `line`
            if not record:
                continue
            if header is None:
                header = record
                twice = next((c for c in header if header.count(c) > 1), None)
                if twice is not None:
                    raise ConfigError(f"data set {source}: the CSV header names the column '{twice}' twice")
                continue
            if len(record) > len(header):
                raise ConfigError(
                    f"data set {source}: line {line} has {len(record)} fields, the header has {len(header)} "
                    "(an unquoted comma?)"
                )
            record += [""] * (len(header) - len(record))
            rows.append(dict(zip(header, record, strict=True)))
            lines.append(line)
    except csv.Error as e:
        raise ConfigError(f"data set {source}: not valid CSV at line {reader.line_num} ({e})") from None
    return rows, lines, header or []


def _parquet_rows(path: Path, spec: DataSpec, source: str) -> tuple[list[dict[str, Any]], list[str], int] | None:
    try:
        import pyarrow.parquet as pq  # installed with datasets; a controller-only install leaves it to the stage
    except ImportError:
        return None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001  pyarrow raises several types for a file it cannot read
        raise ConfigError(f"data set {source}: cannot be read as Parquet ({str(e).splitlines()[0]})") from None
    found = list(table.column_names)
    wanted = [c for c in used_columns(spec) if c in found]
    total = table.num_rows
    if spec.max_rows is not None:
        table = table.slice(0, spec.max_rows)
    return table.select(wanted).to_pylist(), found, total


@dataclass
class LocalFile:
    """What the check read: the file's columns, each checked row's line (JSONL, CSV), and for JSON, JSONL and
    CSV the checked rows themselves (the columns the format trains from), which is what the train stage trains
    on: one reading of the file, so what was checked is what trains."""

    columns: list[str]
    lines: list[int] | None
    rows: list[dict[str, Any]] | None
    count: int  # the rows checked (data.max_rows applied): what the held-out rows come from


def peek_local_file(path: Path, spec: DataSpec, source: str) -> LocalFile | None:
    """Check a local data file row by row before a run exists; the train stage repeats it on what it loads.

    None: a Parquet file this install cannot read (no pyarrow, or not Parquet), which is left to the stage.
    """
    suffix = suffix_of(path, source)
    lines: list[int] | None = None
    if suffix == ".parquet":
        got = _parquet_rows(path, spec, source)
        if got is None:
            return None
        rows, found, total = got
    else:
        text = _text(path, source, suffix)
        if suffix == ".csv" and spec.is_chat:
            raise ConfigError(
                f"data set {source}: a CSV file holds text cells, not conversations; use JSON Lines (.jsonl) with "
                f"a '{spec.turns.column}' list per row"
            )
        if suffix == ".csv":
            rows, lines, found = _csv_rows(text, source)
        else:
            rows, lines = _jsonl_rows(text, source) if suffix == ".jsonl" else _json_rows(text, source)
            found = list(dict.fromkeys(k for r in rows for k in r))
        total = len(rows)
    check_columns(sorted(found), total, spec, source)
    if spec.max_rows is not None:
        rows = rows[: spec.max_rows]
    check_rows(rows, spec, source, lines)
    if suffix == ".parquet":
        return LocalFile(columns=found, lines=None, rows=None, count=len(rows))  # datasets reads its own types
    names = [c for c in used_columns(spec) if c in found]
    return LocalFile(columns=found, lines=lines, rows=[{c: r.get(c) for c in names} for r in rows], count=len(rows))
