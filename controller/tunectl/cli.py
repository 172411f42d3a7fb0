"""The `tunectl` command line. Heavy libraries are never imported here, so every command starts instantly."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from click.exceptions import NoArgsIsHelpError

from . import __version__
from .errors import (
    EXIT_CONFIG_ERROR,
    EXIT_ENVIRONMENT,
    EXIT_FAILURE,
    ConfigError,
    EnvironmentProblem,
    TunectlError,
    describe_os_error,
    redact,
)
from .recipe import builtin_names, load_recipe
from .store import default_store_uri, open_store

_SET_HELP = "override a recipe field, e.g. --set training.max_steps=30 (repeatable)"


class _Group(click.Group):
    """Turns user and environment errors into one line on stderr instead of a traceback (errors.py: codes)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            _fail(str(e), EXIT_CONFIG_ERROR)
        except EnvironmentProblem as e:
            _fail(str(e), EXIT_ENVIRONMENT)
        except TunectlError as e:
            _fail(str(e), EXIT_FAILURE)
        except OSError as e:
            # A file or program of this machine failed (read-only or full disk, a path that is a file): the
            # system's reason and the path are the whole story; a traceback would only hide them.
            _fail(describe_os_error(e), EXIT_ENVIRONMENT)


def _fail(message: str, code: int) -> None:
    # One line, whatever a library put in its message, and no credentials from any URL in it.
    line = redact(" ".join(message.split()))
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunectl")
@click.option(
    "--store",
    envvar="TUNECTL_STORE",
    default=None,
    metavar="URI",
    help=f"artifact store: a directory or s3://BUCKET[/PREFIX] [env TUNECTL_STORE; default {default_store_uri()}]",
)
@click.pass_context
def cli(ctx: click.Context, store: str | None) -> None:
    """Fine-tune an LLM with LoRA, export it and convert it to GGUF, as a pipeline of stages."""
    ctx.obj = {"store": store}


def _backend(ctx: click.Context):  # -> LocalBackend
    from .local import LocalBackend

    return LocalBackend(open_store(ctx.obj["store"]))


def _kube(ctx: click.Context, context: str | None, namespace: str | None):  # -> KubernetesBackend
    from .kube import Cluster, KubernetesBackend

    return KubernetesBackend(Cluster(context, namespace), ctx.obj["store"] or default_store_uri())


def _which(backend: str) -> str:
    if backend != "auto":
        return backend
    from .kube import kubeconfig_present

    return "kubernetes" if kubeconfig_present() else "local"


def cluster_options(f):
    """--backend, --context and --namespace, shared by every command that finds runs."""
    f = click.option("--namespace", "-n", envvar="TUNECTL_NAMESPACE", default=None, help="Kubernetes namespace")(f)
    f = click.option("--context", envvar="TUNECTL_CONTEXT", default=None, help="kubeconfig context")(f)
    return click.option(
        "--backend",
        envvar="TUNECTL_BACKEND",
        type=click.Choice(["auto", "local", "kubernetes"]),
        default="auto",
        show_default=True,
        help="where runs live; auto = kubernetes when a kubeconfig is configured, else local [env TUNECTL_BACKEND]",
    )(f)


def _find(ctx: click.Context, run: str, backend: str, context: str | None, namespace: str | None):
    """The backend that holds RUN: the chosen one, or with auto the cluster, then the local store."""
    chosen = _which(backend)
    if chosen == "local":
        return _backend(ctx)
    be = _kube(ctx, context, namespace)
    if backend == "auto":
        try:
            be.run_record(run)  # one read: is it there? (the caller then asks for what it needs)
        except TunectlError as cluster_error:
            local = _backend(ctx)
            try:
                local.run_record(run)
            except TunectlError:
                raise cluster_error from None
            return local
    return be


def _run_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A RUN argument is a run id, never a path: it names directories in the store and objects in the cluster."""
    from .runid import is_run_id

    if not is_run_id(value):
        raise ConfigError(f"'{value}' is not a run id: `tunectl list` shows them (lower-case letters, digits, '-')")
    return value


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


_VALUES_HELP = "chart values file for Kubernetes runs (repeatable)"
_HELM_SET_HELP = "override a chart value, e.g. --helm-set stages.train.gpus=2 (repeatable)"


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@cluster_options
@click.option("--values", "-f", "values", multiple=True, type=click.Path(path_type=Path), help=_VALUES_HELP)
@click.option("--helm-set", "helm_sets", multiple=True, metavar="KEY=VALUE", help=_HELM_SET_HELP)
@click.option("--run", "run_id", default=None, help="run id (Kubernetes: submitting the same id again is a no-op)")
@click.option(
    "--wait", is_flag=True, help="Kubernetes: follow the run to its end, releasing stages like the reconciler"
)
@click.option("--poll-seconds", default=10.0, show_default=True, help="with --wait: how often to check the store")
@click.option("--quiet", "-q", is_flag=True, help="do not stream stage output (it still goes to the logs)")
@click.pass_context
def submit(
    ctx: click.Context,
    recipe: str,
    overrides: tuple[str, ...],
    backend: str,
    context: str | None,
    namespace: str | None,
    values: tuple[Path, ...],
    helm_sets: tuple[str, ...],
    run_id: str | None,
    wait: bool,
    poll_seconds: float,
    quiet: bool,
) -> None:
    """Run RECIPE's pipeline: train -> merge -> gguf, here (local) or as Kubernetes Jobs."""
    r = load_recipe(recipe, list(overrides))
    if _which(backend) == "kubernetes":
        from .kube import echo_stderr

        be = _kube(ctx, context, namespace)
        run, docs = be.render(r, run_id, values, helm_sets)
        stages = " -> ".join(
            d["metadata"]["labels"]["tunectl.dev/stage"]
            for d in docs[::-1]
            if d["kind"] == "Job" and "tunectl.dev/stage" in d["metadata"]["labels"]
        )
        new = be.submit(run, docs, echo_stderr)
        where = f"namespace {be.namespace} (context {be.cluster.context})"
        click.echo(f"run {run} {'submitted to' if new else 'already exists in'} {where}: {stages}", err=True)
        click.echo(run)
        if wait:
            be.wait(run, poll_seconds, echo_stderr)
            s = be.status(run)
            _print_status(s)
            if s["state"] != "succeeded":
                sys.exit(1)
        return
    if values or helm_sets or wait or run_id:
        raise ConfigError("--values, --helm-set, --run and --wait are for Kubernetes runs (--backend kubernetes)")
    be = _backend(ctx)
    run = be.create(r)
    click.echo(f"run {run}: stages {' -> '.join(be.run_record(run)['stages'])}, store {be.store.uri}", err=True)
    try:
        be.execute(run, echo=None if quiet else sys.stderr)
    except KeyboardInterrupt:
        click.echo(f"\nrun {run} cancelled", err=True)
        sys.exit(130)
    _print_status(be.status(run))


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--values", "-f", "values", multiple=True, type=click.Path(path_type=Path), help=_VALUES_HELP)
@click.option("--helm-set", "helm_sets", multiple=True, metavar="KEY=VALUE", help=_HELM_SET_HELP)
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option("--run", "run_id", default=None, help="run id [default: a new one]")
@click.pass_context
def render(
    ctx: click.Context,
    recipe: str,
    overrides: tuple[str, ...],
    values: tuple[Path, ...],
    helm_sets: tuple[str, ...],
    namespace: str,
    run_id: str | None,
) -> None:
    """Print the Kubernetes objects a run of RECIPE would create (no cluster needed)."""
    from .render import render_run, to_yaml

    store = ctx.obj["store"] or default_store_uri()
    _, docs = render_run(load_recipe(recipe, list(overrides)), store, namespace, run_id, values, helm_sets)
    click.echo(to_yaml(docs), nl=False)


@cli.command()
@click.argument("run", callback=_run_id)
@click.option("--namespace", "-n", envvar="TUNECTL_NAMESPACE", default=None)
@click.option("--context", envvar="TUNECTL_CONTEXT", default=None)
@click.option("--poll-seconds", default=15.0, show_default=True, help="how often to check the store while waiting")
@click.option("--timeout", default=None, type=float, help="give up after this many seconds")
def reconcile(run: str, namespace: str | None, context: str | None, poll_seconds: float, timeout: float | None) -> None:
    """Release RUN's waiting stages as their upstream manifests complete (what the in-cluster reconciler runs)."""
    import resource

    from .kube import Cluster, echo_stderr
    from .reconcile import Reconciler

    cluster = Cluster(context, namespace)
    r = Reconciler(cluster.batch, cluster.namespace, run, poll_seconds=poll_seconds, echo=echo_stderr)
    try:
        states = r.run_until_done(timeout)
    except TimeoutError as e:
        raise TunectlError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - API failures become one line; the Job restarts us
        from kubernetes.client.exceptions import ApiException

        if isinstance(e, ApiException):
            raise cluster.explain(e, f"reconciling {run}") from None
        raise
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = ", ".join(f"{k} {v}" for k, v in states.items())
    echo_stderr(
        f"run {run} finished ({summary}); {r.requests} API requests, cpu {usage.ru_utime + usage.ru_stime:.2f}s"
    )


@cli.command("list")
@cluster_options
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def list_runs(ctx: click.Context, backend: str, context: str | None, namespace: str | None, output: str) -> None:
    """List runs (in the store, or in the cluster's namespace), oldest first."""
    if _which(backend) == "kubernetes":
        kb = _kube(ctx, context, namespace)
        rows, where = kb.list_runs(), f"namespace {kb.namespace}"
    else:
        be = _backend(ctx)
        rows, where = be.list_status(), be.store.uri
    if output == "json":
        _emit_json([{k: s[k] for k in ("run", "recipe", "state", "created", "backend")} for s in rows])
        return
    if not rows:
        click.echo(f"no runs in {where}")
        return
    click.echo(f"{'RUN':<40} {'STATE':<11} {'CREATED':<26} BACKEND")
    for s in rows:
        click.echo(f"{s['run']:<40} {s['state']:<11} {s['created']:<26} {s['backend']}")
    for s in rows:
        if s["state"] == "unknown" and s.get("reason"):
            click.echo(f"note: run {s['run']}: {s['reason']}", err=True)


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
    if m.get("cpu_variant"):
        parts.append(f"llama.cpp CPU variant {m['cpu_variant']}")
    if stage.get("error"):
        parts.append(stage["error"])
    if stage.get("reason"):
        parts.append(stage["reason"])
    return "; ".join(parts)


def _print_status(s: dict[str, Any]) -> None:
    where = f", namespace {s['namespace']}" if "namespace" in s else ""
    click.echo(f"run {s['run']} ({s['recipe']}, {s['backend']}{where}): {s['state']}")
    click.echo(f"{'STAGE':<7} {'STATE':<11} {'SECONDS':>8}  DETAILS")
    for st in s["stages"]:
        secs = f"{st['seconds']:.1f}" if "seconds" in st else "-"
        click.echo(f"{st['stage']:<7} {st['state']:<11} {secs:>8}  {_metric_summary(st)}")
    for st in s["stages"]:
        for note in st.get("notes") or []:
            click.echo(f"note ({st['stage']}): {note}")
    click.echo(f"artifacts: {s['path']}")


@cli.command()
@click.argument("run", callback=_run_id)
@cluster_options
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def status(ctx: click.Context, run: str, backend: str, context: str | None, namespace: str | None, output: str) -> None:
    """Show RUN's stages: state, reason, timings and key metrics."""
    s = _find(ctx, run, backend, context, namespace).status(run)
    if output == "json":
        _emit_json(s)
    else:
        _print_status(s)


@cli.command()
@click.argument("run", callback=_run_id)
@click.option("--stage", type=click.Choice(["train", "merge", "gguf"]), default=None, help="only this stage")
@click.option("--follow", "-f", is_flag=True, help="Kubernetes: stream the stage's log until it ends")
@cluster_options
@click.pass_context
def logs(
    ctx: click.Context,
    run: str,
    stage: str | None,
    follow: bool,
    backend: str,
    context: str | None,
    namespace: str | None,
) -> None:
    """Print RUN's stage logs."""
    be = _find(ctx, run, backend, context, namespace)
    if hasattr(be, "cluster"):
        last = None
        for name, text in be.logs(run, stage, follow):
            if stage is None and name != last:
                click.echo(f"===== {name} =====")
                last = name
            click.echo(text, nl=False)
        return
    if follow:
        raise ConfigError("--follow is for Kubernetes runs; a local run streams while it runs")
    parts = be.logs(run, stage)
    if not parts:
        click.echo(f"run {run} has no logs yet", err=True)
    for name, text in parts:
        if len(parts) > 1:
            click.echo(f"===== {name} =====")
        click.echo(text, nl=False)


@cli.command()
@click.argument("run", callback=_run_id)
@cluster_options
@click.pass_context
def cancel(ctx: click.Context, run: str, backend: str, context: str | None, namespace: str | None) -> None:
    """Stop RUN on the cluster: its Jobs, pods, ConfigMap and RBAC are deleted; artifacts stay in the store."""
    if _which(backend) != "kubernetes":
        raise ConfigError("cancel is for Kubernetes runs; stop a local run with Ctrl-C")
    be = _kube(ctx, context, namespace)
    counts = be.cancel(run)
    click.echo(f"run {run} cancelled: deleted {counts['jobs']} Jobs and {counts['pods']} pods; artifacts kept")


@cli.command("pull")
@click.argument("run", callback=_run_id)
@click.argument("dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option(
    "--to",
    "target",
    default=None,
    metavar="ollama|vllm|DIR",
    help="ollama: create the model on an Ollama server; vllm: a directory `vllm serve` loads; "
    "else a directory to copy into [default: ./RUN]",
)
@click.option("--stage", type=click.Choice(["train", "merge", "gguf"]), default=None, help="only this stage")
@click.option("--quant", default=None, metavar="TYPE", help="only this GGUF type (ollama: default q4_k_m)")
@click.option("--name", default=None, help="model name on the server [default: RUN:QUANT for ollama, RUN for vllm]")
@click.option(
    "--ollama-host", default=None, metavar="HOST", help="Ollama server [default: $OLLAMA_HOST or 127.0.0.1:11434]"
)
@click.option("--adapter", is_flag=True, help="vllm: the LoRA adapter, served on its base, instead of the merged model")
@click.option("--base", default=None, help="vllm --adapter: the 16-bit base as the serving host names it")
@click.pass_context
def pull_cmd(
    ctx: click.Context,
    run: str,
    dir: Path | None,
    target: str | None,
    stage: str | None,
    quant: str | None,
    name: str | None,
    ollama_host: str | None,
    adapter: bool,
    base: str | None,
) -> None:
    """Copy RUN's artifacts into a directory (verified against the manifests, resumable), or onto a serving host.

    \b
      tunectl pull RUN [DIR] [--stage S] [--quant TYPE]      files into DIR (default ./RUN)
      tunectl pull RUN --to ollama [DIR] [--quant q4_k_m] [--name NAME] [--ollama-host HOST]
      tunectl pull RUN --to vllm DIR [--adapter [--base BASE]] [--name NAME]
    """
    from . import pull as p

    kind = target if target in ("ollama", "vllm") else "dir"
    if kind == "dir" and target is not None:
        if dir is not None:
            raise ConfigError(f"two destinations: --to {target} and {dir}; give one")
        dir = Path(target)
    wrong = [
        o
        for o, v, ok in (
            ("--stage", stage, kind == "dir"),
            ("--name", name, kind != "dir"),
            ("--ollama-host", ollama_host, kind == "ollama"),
            ("--adapter", adapter, kind == "vllm"),
            ("--base", base, kind == "vllm" and adapter),
            ("--quant", quant, kind != "vllm"),
        )
        if v and not ok
    ]
    if wrong:
        raise ConfigError(
            f"{wrong[0]} does not apply to pull {'--to ' + kind if kind != 'dir' else 'into a directory'}"
        )
    store = open_store(ctx.obj["store"])
    dest = dir or Path(run)

    @contextlib.contextmanager
    def bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
        with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False) as b:
            yield b.update

    if kind == "dir":
        selections = p.plan(store, run, stage, quant)
        p.transfer(store, run, dest, selections, bar)
        click.echo(f"pulled {', '.join(s.stage for s in selections)} of {run} into {dest}")
    elif kind == "ollama":
        r = p.to_ollama(store, run, dest, quant, name, ollama_host, bar)
        click.echo(f"wrote {r['modelfile']} ({r['quant']}: training prompt as TEMPLATE, EOS as stop)")
        if "hint" in r:
            click.echo("no Ollama client here (install ollama or set TUNECTL_OLLAMA); to create the model run:")
            click.echo(f"  {r['hint']}")
            return
        click.echo(f"created {r['name']} on {r['url']}")
        click.echo(f"asked {r['asked']!r}: answered in {r['tokens']} tokens and stopped: {r['answer'].strip()}")
        if "matches_llama_cpp" in r:
            same = "the same as" if r["matches_llama_cpp"] else "DIFFERENT from"
            click.echo(f"answer is {same} llama.cpp's on this GGUF in the gguf stage (greedy)")
        click.echo(f"  ollama run {r['name']}")
    else:
        if dir is None:
            raise ConfigError("pull --to vllm needs a directory: tunectl pull RUN --to vllm DIR")
        r = p.to_vllm(store, run, dest, adapter, base, name, bar)
        for line in r["fixed"]:
            click.echo(f"fixed {line}")
        click.echo(f"{'adapter' if adapter else 'model'} ready for vLLM in {r['dir']}; serve it with:")
        click.echo(f"  {r['serve']}")
        click.echo("and ask it (the directory's chat template renders the training prompt):")
        click.echo(f"  {r['request']}")


def main() -> None:
    # click's own errors (an unknown option, a missing argument) in one line as well, with where to read more;
    # exit 2 as click and most CLIs use for usage errors.
    try:
        code = cli.main(prog_name="tunectl", standalone_mode=False)
    except NoArgsIsHelpError as e:  # a bare `tunectl` or group: the help is the answer, not an error
        click.echo(e.ctx.get_help())
        code = 0
    except click.UsageError as e:
        more = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        _fail(e.format_message() + more, e.exit_code)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except click.Abort:
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
