"""The `tunectl` command line: it parses options, calls a backend (backend.py) and prints the run model's records
(runmodel.py). Heavy libraries are never imported here, so every command starts instantly."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from click.exceptions import NoArgsIsHelpError

from . import __version__
from .backend import CHOICES, KUBERNETES, LOCAL, Backend, SubmitRequest, order
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
from .runmodel import STAGES, RunState, RunStatus, StageState, StageStatus, format_error
from .stores import default_store_uri, open_store

_SET_HELP = "override a recipe field, e.g. --set training.max_steps=30 (repeatable)"

_AUTO_RULE = """\b
--backend auto (the default) decides where runs are:
  submit             kubernetes when a kubeconfig is configured (KUBECONFIG, ~/.kube/config
                     or in a pod) and the store is s3://; otherwise local
  status/logs/cancel the local store first, then the cluster (when a kubeconfig is configured)
  list               the local store, plus the cluster's namespace when a kubeconfig is
                     configured and it answers within TUNECTL_KUBE_TIMEOUT (default 10s)
--backend local or kubernetes uses that one alone.

\b
--store, --backend, --context and --namespace may come before or after the command
(after wins): tunectl submit ruozhiba --store s3://bucket/runs"""


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
    click.echo(redact(format_error(message)), err=True)
    sys.exit(code)


# -- the options every run command takes, before or after its name ---------------------------------------------

_STORE_HELP = f"artifact store: a directory or s3://BUCKET[/PREFIX] [env TUNECTL_STORE; default {default_store_uri()}]"
_BACKEND_HELP = "where runs are: auto, local or kubernetes (auto: see `tunectl --help`) [env TUNECTL_BACKEND]"
_SHARED: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "store": (("--store",), {"metavar": "URI", "help": _STORE_HELP}),
    "backend": (("--backend",), {"type": click.Choice(CHOICES), "help": _BACKEND_HELP}),
    "context": (("--context",), {"help": "kubeconfig context [env TUNECTL_CONTEXT]"}),
    "namespace": (("--namespace", "-n"), {"help": "Kubernetes namespace [env TUNECTL_NAMESPACE]"}),
}


@dataclass(frozen=True)
class Options:
    store: str | None
    backend: str
    context: str | None
    namespace: str | None

    @property
    def store_uri(self) -> str:
        return self.store or default_store_uri()


def _override(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A shared option given after the command replaces the one given before it (or its environment variable)."""
    if value is not None:
        ctx.ensure_object(dict)[param.name] = value
    return value


def shared(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The shared options `names`, accepted after the command too (the value lands in ctx.obj; see `_opts`)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            decls, kw = _SHARED[name]
            f = click.option(*decls, name, default=None, expose_value=False, callback=_override, **kw)(f)
        return f

    return decorate


def _opts(ctx: click.Context) -> Options:
    obj = ctx.ensure_object(dict)
    return Options(obj.get("store"), obj.get("backend") or "auto", obj.get("context"), obj.get("namespace"))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_AUTO_RULE)
@click.version_option(__version__, prog_name="tunectl")
@click.option("--store", envvar="TUNECTL_STORE", default=None, metavar="URI", help=_STORE_HELP)
@click.option(
    "--backend",
    envvar="TUNECTL_BACKEND",
    type=click.Choice(CHOICES),
    default="auto",
    show_default=True,
    help="where runs are (see below) [env TUNECTL_BACKEND]",
)
@click.option("--context", envvar="TUNECTL_CONTEXT", default=None, help="kubeconfig context [env TUNECTL_CONTEXT]")
@click.option(
    "--namespace", "-n", envvar="TUNECTL_NAMESPACE", default=None, help="Kubernetes namespace [env TUNECTL_NAMESPACE]"
)
@click.pass_context
def cli(ctx: click.Context, store: str | None, backend: str, context: str | None, namespace: str | None) -> None:
    """Fine-tune an LLM with LoRA, export it and convert it to GGUF, as a pipeline of stages."""
    ctx.obj = {"store": store, "backend": backend, "context": context, "namespace": namespace}


# -- backends ---------------------------------------------------------------------------------------------------


def _local(o: Options) -> Backend:
    from .local import LocalBackend

    return LocalBackend(open_store(o.store))


def _kubernetes(o: Options) -> Backend:
    from .kube import Cluster, KubernetesBackend

    return KubernetesBackend(Cluster(o.context, o.namespace), o.store_uri)


_OPEN: dict[str, Callable[[Options], Backend]] = {LOCAL: _local, KUBERNETES: _kubernetes}


def _order(o: Options, command: str) -> tuple[str, ...]:
    from .kube import kubeconfig_present

    return order(o.backend, command, kubeconfig_present(), o.store_uri)


def _holding(o: Options, run: str) -> Backend:
    """The backend that holds RUN (the --backend auto rule for a command naming a run: backend.py)."""
    names = _order(o, "run")
    if len(names) == 1:
        return _OPEN[names[0]](o)  # its own "no run" error names where it looked
    looked: list[str] = []
    store_error: TunectlError | None = None
    for name in names:
        try:
            be = _OPEN[name](o)
            if be.has(run):
                return be
            looked.append(be.describe())
        except TunectlError as e:
            if name == LOCAL:
                store_error = e  # the store cannot be read: the cluster may still hold the run
                continue
            if store_error:
                raise store_error from None
            why = getattr(e, "why", str(e))  # kube.Unreachable: the reason alone
            raise TunectlError(
                f"no run '{run}' in {' or '.join(looked)}, and the cluster could not be asked: {why}"
            ) from None
    if store_error:
        raise store_error
    raise TunectlError(f"no run '{run}' in {' or in '.join(looked)}")


def _run_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A RUN argument is a run id, never a path: it names directories in the store and objects in the cluster."""
    from .runid import is_run_id

    if not is_run_id(value):
        raise ConfigError(f"'{value}' is not a run id: `tunectl list` shows them (lower-case letters, digits, '-')")
    return value


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


def _to_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


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
    r = load_recipe(recipe, list(overrides))
    t = r.training
    click.echo(r.show_yaml(), nl=False)
    click.echo(
        f"# rows per optimizer step: per-device batch {t.per_device_train_batch_size} x gradient accumulation "
        f"{t.gradient_accumulation_steps} x processes {t.world_size} = {t.effective_batch_size}"
    )


# -- runs ----------------------------------------------------------------------------------------------


_VALUES_HELP = "chart values file for Kubernetes runs (repeatable)"
_HELM_SET_HELP = "override a chart value, e.g. --helm-set stages.train.gpus=2 (repeatable)"
_STAGE = click.Choice(list(STAGES))


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@shared("store", "backend", "context", "namespace")
@click.option("--values", "-f", "values", multiple=True, type=click.Path(path_type=Path), help=_VALUES_HELP)
@click.option("--helm-set", "helm_sets", multiple=True, metavar="KEY=VALUE", help=_HELM_SET_HELP)
@click.option(
    "--run", "run_id", default=None, help="run id [default: a new one]; Kubernetes: the same id again is a no-op"
)
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
    values: tuple[Path, ...],
    helm_sets: tuple[str, ...],
    run_id: str | None,
    wait: bool,
    poll_seconds: float,
    quiet: bool,
) -> None:
    """Run RECIPE's pipeline: train -> merge -> gguf, here (local) or as Kubernetes Jobs.

    Prints the run id; a local run (and a Kubernetes one with --wait) then runs to its end and its status
    is printed; the exit code is 1 unless it succeeded."""
    o = _opts(ctx)
    r = load_recipe(recipe, list(overrides))
    be = _OPEN[_order(o, "submit")[0]](o)
    sub = be.submit(SubmitRequest(r, run_id, values, helm_sets), _to_stderr)
    verb = "submitted to" if sub.created else "already exists in"
    click.echo(f"run {sub.run}: stages {' -> '.join(sub.stages)}; {verb} {be.describe()}", err=True)
    click.echo(sub.run)
    if not (wait or be.runs_here):
        return
    try:
        s = be.wait(sub.run, None if quiet else _to_stderr, poll_seconds)
    except KeyboardInterrupt:
        if be.runs_here:
            click.echo(f"\nrun {sub.run} cancelled (`tunectl resume {sub.run}` goes on)", err=True)
        else:
            click.echo(f"\nstopped following run {sub.run}; it goes on (tunectl cancel {sub.run} stops it)", err=True)
        sys.exit(130)
    _print_final(s)


@cli.command()
@click.argument("run", callback=_run_id)
@shared("store", "backend", "context", "namespace")
@click.option("--quiet", "-q", is_flag=True, help="do not stream stage output (it still goes to the logs)")
@click.pass_context
def resume(ctx: click.Context, run: str, quiet: bool) -> None:
    """Go on with a local RUN that was interrupted, cancelled or failed: stages that published are not run again,
    and train continues from its newest checkpoint. (A Kubernetes run resumes by itself: its Job retries.)"""
    be = _holding(_opts(ctx), run)
    try:
        s = be.resume(run, None if quiet else _to_stderr)
    except KeyboardInterrupt:
        click.echo(f"\nrun {run} cancelled (`tunectl resume {run}` goes on)", err=True)
        sys.exit(130)
    _print_final(s)


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--values", "-f", "values", multiple=True, type=click.Path(path_type=Path), help=_VALUES_HELP)
@click.option("--helm-set", "helm_sets", multiple=True, metavar="KEY=VALUE", help=_HELM_SET_HELP)
@shared("store", "namespace")
@click.option("--run", "run_id", default=None, help="run id [default: a new one]")
@click.pass_context
def render(
    ctx: click.Context,
    recipe: str,
    overrides: tuple[str, ...],
    values: tuple[Path, ...],
    helm_sets: tuple[str, ...],
    run_id: str | None,
) -> None:
    """Print the Kubernetes objects a run of RECIPE would create (no cluster needed; namespace default "default")."""
    from .render import render_run, to_yaml

    o = _opts(ctx)
    r = load_recipe(recipe, list(overrides))
    namespace = "default" if o.namespace is None else o.namespace
    _, docs = render_run(r, o.store_uri, namespace, run_id, values, helm_sets)
    click.echo(to_yaml(docs), nl=False)


@cli.command()
@click.argument("run", callback=_run_id)
@shared("context", "namespace")
@click.option("--poll-seconds", default=15.0, show_default=True, help="how often to check the store while waiting")
@click.option("--timeout", default=None, type=float, help="give up after this many seconds")
@click.pass_context
def reconcile(ctx: click.Context, run: str, poll_seconds: float, timeout: float | None) -> None:
    """Release RUN's waiting stages as their upstream manifests complete (what the in-cluster reconciler runs)."""
    import resource

    from .kube import Cluster, api_call, timestamped
    from .reconcile import Reconciler

    o = _opts(ctx)
    cluster = Cluster(o.context, o.namespace)
    echo = timestamped(_to_stderr)
    r = Reconciler(cluster.batch, cluster.namespace, run, poll_seconds=poll_seconds, echo=echo, call=api_call)
    with cluster.failures(f"reconciling {run}"):  # one line, then exit 1: the Job starts a new pod
        states = r.run_until_done(timeout)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = ", ".join(f"{k} {v}" for k, v in states.items())
    echo(f"run {run} finished ({summary}); {r.requests} API requests, cpu {usage.ru_utime + usage.ru_stime:.2f}s")


_LIST_FIELDS = ("run", "recipe", "state", "created", "backend", "store", "namespace", "context")


@cli.command("list")
@shared("store", "backend", "context", "namespace")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def list_runs(ctx: click.Context, output: str) -> None:
    """List runs, oldest first per backend: the store's (local), the cluster namespace's (kubernetes), or with
    --backend auto both where a kubeconfig is configured (see `tunectl --help`). The BACKEND column (json:
    "backend") says where each run is; stderr says what was listed."""
    o = _opts(ctx)
    rows: list[RunStatus] = []
    listed: list[Backend] = []
    for i, name in enumerate(_order(o, "list")):
        try:
            be = _OPEN[name](o)
            rows += be.list_runs()
            listed.append(be)
        except TunectlError as e:
            if o.backend != "auto" or i == 0:
                raise
            click.echo(f"note: {name} runs not listed: {e}", err=True)
    click.echo("listed " + "; ".join(f"{be.name}: {be.describe()}" for be in listed), err=True)
    if output == "json":
        _emit_json([{k: v for k, v in s.to_dict().items() if k in _LIST_FIELDS} for s in rows])
        return
    if not rows:
        click.echo(f"no runs in {' or '.join(be.describe() for be in listed)}")
        return
    click.echo(f"{'RUN':<40} {'STATE':<11} {'CREATED':<26} BACKEND")
    for s in rows:
        click.echo(f"{s.run:<40} {s.state:<11} {s.created:<26} {s.backend}")
    for s in rows:
        if s.state == RunState.UNKNOWN and s.reason:
            click.echo(f"note: run {s.run}: {s.reason}", err=True)


def _metric_summary(stage: StageStatus) -> str:
    m = stage.metrics or {}
    parts = []
    if m.get("final_loss") is not None:
        parts.append(f"loss {m['first_loss']:.3f} -> {m['final_loss']:.3f} in {m['steps']} steps ({m['backend']})")
    if m.get("eval_perplexity_after") is not None:
        parts.append(f"held-out perplexity {m['eval_perplexity_before']:.3f} -> {m['eval_perplexity_after']:.3f}")
    if m.get("exports"):
        parts.append("exports " + ", ".join(m["exports"]))
    if m.get("smoke"):
        parts.append(
            "smoke " + ", ".join(f"{t}: {v['finish_reason']} after {v['tokens']} tok" for t, v in m["smoke"].items())
        )
    fidelity = (m.get("fidelity") or {}).get("types") or {}
    measured = {t: f for t, f in fidelity.items() if "kld" in f and t != m["fidelity"].get("reference")}
    if measured:
        parts.append(
            f"vs {m['fidelity']['reference']}: "
            + ", ".join(f"{t} KLD {f['kld']:.4f} top-1 {100 * f['top1']:.1f}%" for t, f in measured.items())
        )
    if m.get("cpu_variant"):
        parts.append(f"llama.cpp CPU variant {m['cpu_variant']}")
    if stage.error:
        parts.append(stage.error)
    if stage.reason:
        parts.append(stage.reason)
    if stage.attempts and stage.state != StageState.FAILED:  # a failed stage's reason counts them
        earlier = f", {stage.earlier_seconds:.0f}s before this one" if stage.earlier_seconds else ""
        parts.append(f"{stage.attempts} attempts{earlier}")
    if stage.checkpoint:
        c = stage.checkpoint
        parts.append(f"checkpoint at step {c.get('step')} ({_age(c.get('saved'))} old, {c.get('why')})")
    return "; ".join(parts)


def _age(saved: Any) -> str:
    try:
        seconds = (datetime.now(UTC) - datetime.fromisoformat(str(saved))).total_seconds()
    except ValueError:
        return "?"
    return (
        f"{seconds:.0f}s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def _print_final(s: RunStatus) -> None:
    """A run that ended here: its status, then exit 1 with its failure line unless it succeeded."""
    _print_status(s)
    failure = s.failure()
    if failure:
        raise TunectlError(failure)


def _print_status(s: RunStatus) -> None:
    where = f", namespace {s.namespace}" if s.namespace else ""
    click.echo(f"run {s.run} ({s.recipe}, {s.backend}{where}): {s.state}")
    click.echo(f"{'STAGE':<7} {'STATE':<11} {'SECONDS':>8}  DETAILS")
    for st in s.stages:
        secs = f"{st.seconds:.1f}" if st.seconds is not None else "-"
        click.echo(f"{st.stage:<7} {st.state:<11} {secs:>8}  {_metric_summary(st)}")
    for st in s.stages:
        if st.phases:
            click.echo(f"phases ({st.stage}, s): " + ", ".join(f"{k} {v:g}" for k, v in st.phases.items()))
    for st in s.stages:
        for note in st.notes or []:
            click.echo(f"note ({st.stage}): {note}")
    click.echo(f"artifacts: {s.path}")


@cli.command()
@click.argument("run", callback=_run_id)
@shared("store", "backend", "context", "namespace")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def status(ctx: click.Context, run: str, output: str) -> None:
    """Show RUN's stages: state, reason, timings and key metrics."""
    s = _holding(_opts(ctx), run).status(run)
    if output == "json":
        _emit_json(s.to_dict())
    else:
        _print_status(s)


@cli.command()
@click.argument("run", callback=_run_id)
@shared("store", "backend", "context", "namespace")
@click.option(
    "--output", "-o", default=None, metavar="FILE|json",
    help="where the HTML page goes [default: ./RUN.html]; json: the same content on stdout; - : the page on stdout",
)  # fmt: skip
@click.option("--open", "open_page", is_flag=True, help="open the page in a browser")
@click.option(
    "--gpu-hour-price", type=click.FloatRange(min=0), default=None, help="price of one GPU-hour: an estimated cost"
)
@click.pass_context
def report(ctx: click.Context, run: str, output: str | None, open_page: bool, gpu_hour_price: float | None) -> None:
    """RUN on one page: loss and held-out curves, answers before and after, each GGUF's size, smoke answer and
    fidelity, time per stage and phase, GPU-hours. Self-contained HTML (no network), or JSON."""
    from .files import write_atomic
    from .report import collect, render_html

    s = _holding(_opts(ctx), run).status(run)
    if not s.store:
        raise TunectlError(f"run {run} names no store to read its manifests from")
    doc = collect(s, open_store(s.store), gpu_hour_price)
    if output == "json":
        _emit_json(doc)
        return
    page = render_html(doc)
    if output == "-":
        click.echo(page)
        return
    path = Path(output or f"{run}.html")
    write_atomic(path, page, durable=False)
    click.echo(f"report: {path.resolve()}")
    if open_page:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@cli.command()
@click.argument("run", callback=_run_id)
@click.option("--stage", type=_STAGE, default=None, help="only this stage")
@click.option("--follow", "-f", is_flag=True, help="Kubernetes: stream the stage's log until it ends")
@shared("store", "backend", "context", "namespace")
@click.pass_context
def logs(ctx: click.Context, run: str, stage: str | None, follow: bool) -> None:
    """Print RUN's stage logs (each under a `===== STAGE =====` line unless --stage picks one)."""
    last = None
    for name, text in _holding(_opts(ctx), run).logs(run, stage, follow):
        if stage is None and name != last:
            click.echo(f"===== {name} =====")
        last = name
        click.echo(text, nl=False)
    if last is None:
        click.echo(f"run {run} has no logs yet", err=True)


@cli.command()
@click.argument("run", callback=_run_id)
@shared("store", "backend", "context", "namespace")
@click.pass_context
def cancel(ctx: click.Context, run: str) -> None:
    """Stop RUN on the cluster: its Jobs, pods, ConfigMap and RBAC are deleted; artifacts stay in the store."""
    counts = _holding(_opts(ctx), run).cancel(run, echo=lambda line: click.echo(line, err=True))
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
@click.option("--stage", type=_STAGE, default=None, help="only this stage")
@click.option("--quant", default=None, metavar="TYPE", help="only this GGUF type (ollama: default q4_k_m)")
@click.option("--name", default=None, help="model name on the server [default: RUN:QUANT for ollama, RUN for vllm]")
@click.option(
    "--ollama-host", default=None, metavar="HOST", help="Ollama server [default: $OLLAMA_HOST or 127.0.0.1:11434]"
)
@click.option("--adapter", is_flag=True, help="vllm: the LoRA adapter, served on its base, instead of the merged model")
@click.option("--base", default=None, help="vllm --adapter: the 16-bit base as the serving host names it")
@shared("store")
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
    store = open_store(_opts(ctx).store)
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
