"""The `tunectl` command line. Heavy libraries are never imported here, so every command starts instantly."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import ConfigError, TunectlError
from .recipe import builtin_names, load_recipe
from .store import default_store_uri, open_store

_SET_HELP = "override a recipe field, e.g. --set training.max_steps=30 (repeatable)"


class _Group(click.Group):
    """Turns user errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except TunectlError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunectl")
@click.option(
    "--store",
    envvar="TUNECTL_STORE",
    default=None,
    metavar="URI",
    help=f"artifact store (directory or file:// URI) [env TUNECTL_STORE; default {default_store_uri()}]",
)
@click.pass_context
def cli(ctx: click.Context, store: str | None) -> None:
    """Fine-tune an LLM with LoRA, export it and convert it to GGUF, as a pipeline of stages."""
    ctx.obj = {"store": store}


def _backend(ctx: click.Context):  # -> LocalBackend
    from .local import LocalBackend

    return LocalBackend(open_store(ctx.obj["store"]))


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


# -- recipes -------------------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List the built-in recipes (`recipes show NAME` prints one resolved)."""
    if ctx.invoked_subcommand is None:
        for name in builtin_names():
            r = load_recipe(name)
            click.echo(f"{name:<16} {r.description}")


@recipes.command("show")
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
def recipes_show(recipe: str, overrides: tuple[str, ...]) -> None:
    """Print RECIPE (a built-in name or a YAML file) with defaults and overrides resolved."""
    click.echo(load_recipe(recipe, list(overrides)).to_yaml(), nl=False)


# -- runs ----------------------------------------------------------------------------------------------


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option(
    "--backend", type=click.Choice(["local"]), default="local", show_default=True, help="where the stages run"
)
@click.option("--quiet", "-q", is_flag=True, help="do not stream stage output (it still goes to the logs)")
@click.pass_context
def submit(ctx: click.Context, recipe: str, overrides: tuple[str, ...], backend: str, quiet: bool) -> None:
    """Run RECIPE's pipeline: train -> merge -> gguf."""
    r = load_recipe(recipe, list(overrides))
    be = _backend(ctx)
    run = be.create(r)
    click.echo(f"run {run}: stages {' -> '.join(be.run_record(run)['stages'])}, store {be.store.uri}", err=True)
    try:
        be.execute(run, echo=None if quiet else sys.stderr)
    except KeyboardInterrupt:
        click.echo(f"\nrun {run} cancelled", err=True)
        sys.exit(130)
    _print_status(be.status(run))


@cli.command("list")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def list_runs(ctx: click.Context, output: str) -> None:
    """List runs in the store, oldest first."""
    be = _backend(ctx)
    rows = [be.status(run) for run in be.store.list_runs()]
    if output == "json":
        _emit_json([{k: s[k] for k in ("run", "recipe", "state", "created", "backend")} for s in rows])
        return
    if not rows:
        click.echo(f"no runs in {be.store.uri}")
        return
    click.echo(f"{'RUN':<40} {'STATE':<11} {'CREATED':<26} BACKEND")
    for s in rows:
        click.echo(f"{s['run']:<40} {s['state']:<11} {s['created']:<26} {s['backend']}")


def _metric_summary(stage: dict[str, Any]) -> str:
    m = stage.get("metrics") or {}
    parts = []
    if m.get("final_loss") is not None:
        parts.append(f"loss {m['first_loss']:.3f} -> {m['final_loss']:.3f} in {m['steps']} steps ({m['backend']})")
    if m.get("exports"):
        parts.append("exports " + ", ".join(m["exports"]))
    if m.get("smoke"):
        parts.append(
            "smoke " + ", ".join(f"{t}: {v['finish_reason']} after {v['tokens']} tok" for t, v in m["smoke"].items())
        )
    if stage.get("error"):
        parts.append(stage["error"])
    if stage.get("reason"):
        parts.append(stage["reason"])
    return "; ".join(parts)


def _print_status(s: dict[str, Any]) -> None:
    click.echo(f"run {s['run']} ({s['recipe']}, {s['backend']}): {s['state']}")
    click.echo(f"{'STAGE':<7} {'STATE':<11} {'SECONDS':>8}  DETAILS")
    for st in s["stages"]:
        secs = f"{st['seconds']:.1f}" if "seconds" in st else "-"
        click.echo(f"{st['stage']:<7} {st['state']:<11} {secs:>8}  {_metric_summary(st)}")
    for st in s["stages"]:
        for note in st.get("notes") or []:
            click.echo(f"note ({st['stage']}): {note}")
    click.echo(f"artifacts: {s['path']}")


@cli.command()
@click.argument("run")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def status(ctx: click.Context, run: str, output: str) -> None:
    """Show RUN's stages: state, timings and key metrics."""
    s = _backend(ctx).status(run)
    if output == "json":
        _emit_json(s)
    else:
        _print_status(s)


@cli.command()
@click.argument("run")
@click.option("--stage", type=click.Choice(["train", "merge", "gguf"]), default=None, help="only this stage")
@click.pass_context
def logs(ctx: click.Context, run: str, stage: str | None) -> None:
    """Print RUN's stage logs."""
    parts = _backend(ctx).logs(run, stage)
    if not parts:
        click.echo(f"run {run} has no logs yet", err=True)
    for name, text in parts:
        if len(parts) > 1:
            click.echo(f"===== {name} =====")
        click.echo(text, nl=False)


@cli.command("pull")
@click.argument("run")
@click.option(
    "--to",
    "dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="destination directory [default: ./RUN]",
)
@click.option("--stage", type=click.Choice(["train", "merge", "gguf"]), default=None, help="only this stage")
@click.option("--quant", default=None, metavar="TYPE", help="only this GGUF type (e.g. q4_k_m), with its Modelfile")
@click.pass_context
def pull_cmd(ctx: click.Context, run: str, dest: Path | None, stage: str | None, quant: str | None) -> None:
    """Copy RUN's artifacts into a directory: verified against the manifests, resumable, skips what is there."""
    from .pull import plan, pull

    store = open_store(ctx.obj["store"])
    selections = plan(store, run, stage, quant)
    dest = dest or Path(run)
    total = sum(s.size for s in selections)
    label = f"{run}: {sum(s.files for s in selections)} files, {total / 2**20:.1f} MiB"
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False) as bar:
        pull(store, run, dest, selections, bar.update)
    click.echo(f"pulled {', '.join(s.stage for s in selections)} of {run} into {dest}")


def main() -> None:
    cli(prog_name="tunectl")


if __name__ == "__main__":
    main()
