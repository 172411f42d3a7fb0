"""YAML from users (recipes, --set values, chart values files), read with bounds.

`yaml.safe_load` refuses Python tags but expands aliases: a few hundred bytes of nested `&a [*b, *b, ...]`
become gigabytes once anything walks the result (printing a recipe, validating it, dumping it into a
ConfigMap). Nothing tunectl reads needs aliases (a recipe reuses another with `extends:`), so they are refused
outright, and documents are capped in size, before anything is built from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 20  # a recipe is a few KB; a MiB leaves room for long prompt templates and test prompts


class RefusedYAML(ConfigError):
    """Well-formed YAML that tunectl will not read (aliases, or too large)."""


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RefusedYAML(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not supported here; "
                "write the value out"
            )
        return super().compose_node(parent, index)


def load(text: str, source: str) -> Any:
    """One YAML document from `text`; `source` names it in the one-line error (a file, or `--set KEY`)."""
    if len(text.encode("utf-8", errors="surrogatepass")) > MAX_BYTES:
        raise RefusedYAML(f"{source}: larger than {MAX_BYTES >> 10} KiB; is this the right file?")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except RefusedYAML as e:
        raise RefusedYAML(f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None


def read(path: Path) -> Any:
    """A YAML file, decoded as UTF-8 (a file in another encoding is one line, not a traceback)."""
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    if path.stat().st_size > MAX_BYTES:  # before reading it: a wrong path may name something huge
        raise RefusedYAML(f"{path}: larger than {MAX_BYTES >> 10} KiB; is this the right file?")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return load(text, str(path))
