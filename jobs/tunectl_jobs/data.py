"""Loading the training data with `datasets` and formatting it as Alpaca prompt + response + EOS."""

from __future__ import annotations

from typing import Any

from tunectl.datacheck import check_columns
from tunectl.errors import ConfigError
from tunectl.recipe import DataSpec
from tunectl.refs import resolve

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load(spec: DataSpec) -> Any:
    """A `datasets.Dataset` with the Alpaca columns checked; Hub ids and local files alike."""
    import datasets

    ref = resolve(spec.source, "data set")
    try:
        if ref.path is not None:
            builder = _BUILDERS.get(ref.path.suffix)
            if builder is None:
                raise ConfigError(f"data set {spec.source}: unsupported file type (use .json, .jsonl, .parquet, .csv)")
            ds = datasets.load_dataset(builder, data_files={spec.split: str(ref.path)}, split=spec.split)
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
    return ds


def format_alpaca(ds: Any, spec: DataSpec, eos_token: str) -> Any:
    """Add a `text` column: the prompt template filled in, with EOS so the model learns to stop."""
    cols = spec.columns
    template = spec.prompt_template
    suffix = eos_token if spec.add_eos else ""
    has_input = cols.input in ds.column_names

    def fmt(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
        n = len(batch[cols.instruction])
        inputs = batch[cols.input] if has_input else [""] * n
        return {
            "text": [
                template.format(instruction=i or "", input=x or "", output=o or "") + suffix
                for i, x, o in zip(batch[cols.instruction], inputs, batch[cols.output], strict=True)
            ]
        }

    return ds.map(fmt, batched=True, remove_columns=ds.column_names)
