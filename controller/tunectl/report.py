"""`tunectl report RUN`: what a run produced, measured and cost, on one self-contained HTML page (or as JSON).

Everything comes from the run's status (either backend) and the stages' manifests and small JSON files in its
store (either kind): the recipe and what identifies its inputs, the training and held-out loss, learning rate and
gradient norm per step, the test prompts' answers before and after training, each GGUF's size, smoke answer and
fidelity to the 16-bit file, wall time per stage and phase, and GPU time. The page has no script and loads
nothing: its charts are inline SVG, so it opens anywhere, offline, and can be mailed as one file.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from . import __version__
from .runmodel import RunStatus
from .stores.base import Store

# Dense BF16 tensor throughput from NVIDIA's data sheets, by a name torch reports (longest match wins). MFU is
# left out for a GPU not listed here.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 80GB HBM3": 989.0,  # SXM
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def peak_tflops(device: str | None) -> float | None:
    if not device:
        return None
    names = [n for n in PEAK_BF16_TFLOPS if n in device]
    return PEAK_BF16_TFLOPS[max(names, key=len)] if names else None


def flops_per_token(shape: dict[str, int], lora_r: int, targets: list[str]) -> float:
    """Training FLOPs per token of LoRA on a frozen base, linear layers only: every frozen weight costs 2 forward
    and 2 for the input gradients, each LoRA weight 6 (its own gradient too). Attention's score products and
    recomputation are not counted, so the MFU from it is a lower bound."""
    d, f, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    dq, dkv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    shapes = {"q_proj": (d, dq), "k_proj": (d, dkv), "v_proj": (d, dkv), "o_proj": (dq, d), "gate_proj": (d, f),
              "up_proj": (d, f), "down_proj": (f, d)}  # fmt: skip
    frozen = layers * sum(a * b for a, b in shapes.values()) + d * v
    lora = layers * sum(lora_r * (a + b) for name, (a, b) in shapes.items() if name in targets)
    return 4.0 * frozen + 6.0 * lora


def _json_file(store: Store, run: str, stage: str, name: str, manifest: dict[str, Any] | None) -> Any:
    """A small JSON file the stage published (None where its manifest lists none)."""
    if not manifest or name not in manifest.get("files", {}):
        return None
    text = store.read_text(f"runs/{run}/{stage}/{name}")
    return json.loads(text) if text else None


def collect(status: RunStatus, store: Store, gpu_hour_price: float | None = None) -> dict[str, Any]:
    """The report's content: what the page shows and `--output json` prints."""
    run = status.run
    manifests = {s.stage: store.manifest(run, s.stage) for s in status.stages}
    train, gguf = manifests.get("train"), manifests.get("gguf")
    recipe_text = store.read_text(f"runs/{run}/recipe.yaml")
    tm = (train or {}).get("metrics", {})
    doc: dict[str, Any] = {
        "run": run,
        "recipe": status.recipe,
        "backend": status.backend,
        "state": str(status.state),
        "created": status.created,
        "store": status.store,
        "report_by": f"tunectl {__version__}",
        "lineage": {**(train or {}).get("inputs", {}), "versions": (train or {}).get("versions", {})},
        "recipe_yaml": recipe_text,
        "stages": [],
        "training": None,
        "answers": [],
        "gguf": [],
    }
    gpu_seconds = 0.0
    for s in status.stages:
        m = manifests.get(s.stage) or {}
        metrics = m.get("metrics") or s.metrics or {}
        device = metrics.get("device")  # train and merge record theirs; gguf runs llama.cpp on CPUs
        gpus = (metrics.get("processes") or 1) if device and device != "cpu" else 0
        seconds = s.seconds or (m.get("timings") or {}).get("seconds")
        if gpus and seconds:  # a stopped and resumed stage held its GPUs in every attempt
            gpu_seconds += (seconds + (s.earlier_seconds or 0.0)) * gpus
        phases = (m.get("timings") or {}).get("phases") or s.phases or {}
        doc["stages"].append({"stage": s.stage, "state": str(s.state), "seconds": seconds, "phases": phases,
                              "gpus": gpus, "attempts": s.attempts or 1, "earlier_seconds": s.earlier_seconds,
                              "notes": m.get("notes") or s.notes or [], "error": s.error})  # fmt: skip
    doc["gpu"] = {
        "device": tm.get("device"),
        "gpu_hours": round(gpu_seconds / 3600, 4),
        "price_per_gpu_hour": gpu_hour_price,
        "estimated_cost": round(gpu_seconds / 3600 * gpu_hour_price, 2) if gpu_hour_price is not None else None,
        "peak_memory_gib": tm.get("peak_gpu_mem_gib"),
    }
    if train:
        losses = _json_file(store, run, "train", "loss.json", train) or []
        evals = _json_file(store, run, "train", "eval.json", train)
        training = {
            "steps": tm.get("steps"), "backend": tm.get("backend"), "processes": tm.get("processes"),
            "rows_per_step": tm.get("rows_per_step"), "first_loss": tm.get("first_loss"),
            "final_loss": tm.get("final_loss"), "train_seconds": tm.get("train_seconds"),
            "tokens_trained": tm.get("tokens_trained"), "tokens_per_s": tm.get("tokens_per_s"),
            "tokens_basis": tm.get("tokens_basis"),
            "trainable_params": tm.get("trainable_params"), "losses": losses,
            "eval": evals, "mfu": None,
        }  # fmt: skip
        shape, peak = tm.get("model_shape"), peak_tflops(tm.get("device"))
        rec = _recipe_fields(recipe_text)
        if shape and peak and tm.get("tokens_per_s") and rec:
            per_token = flops_per_token(shape, rec["r"], rec["targets"])
            per_gpu = tm["tokens_per_s"] / max(1, tm.get("processes") or 1)
            training["mfu"] = round(per_gpu * per_token / (peak * 1e12), 4)
            training["mfu_basis"] = f"{per_token / 1e9:.2f} GFLOP per token (linear layers), {peak:g} TFLOP/s peak"
        doc["training"] = training
        gens = _json_file(store, run, "train", "generations.json", train) or []
        before = [g for g in gens if g.get("stage") == "before"]
        after = [g for g in gens if g.get("stage") == "after"]
        asked = _test_prompts(recipe_text)
        for i, a in enumerate(after):
            b = before[i] if i < len(before) else {}
            doc["answers"].append({
                "asked": asked[i] if i < len(asked) else None, "prompt": a.get("prompt"),
                "before": b.get("answer"), "after": a.get("answer"),
                "before_stopped": b.get("stopped_at_eos"), "after_stopped": a.get("stopped_at_eos"),
            })  # fmt: skip
    if gguf:
        gm = gguf.get("metrics", {})
        fidelity = gm.get("fidelity") or {}
        smoke = {e.get("type"): e for e in gguf.get("smoke", [])}
        for t in gm.get("types", []):
            f = (fidelity.get("types") or {}).get(t, {})
            e = smoke.get(t, {})
            doc["gguf"].append({
                "type": t, "size_mib": (gm.get("sizes_mib") or {}).get(t), "smoke_answer": e.get("answer"),
                "smoke_finish": e.get("finish_reason"), "smoke_tokens": e.get("completion_tokens"),
                "perplexity": f.get("perplexity"), "kld": f.get("kld"), "kld_p99": f.get("kld_p99"),
                "top1": f.get("top1"), "fidelity_error": f.get("error"),
            })  # fmt: skip
        doc["fidelity_reference"] = fidelity.get("reference")
        doc["fidelity_rows"] = fidelity.get("source")
    return doc


def _test_prompts(recipe_yaml: str | None) -> list[str]:
    """Each test prompt as a person wrote it (system, instruction, input), for the answers table."""
    import yaml

    try:
        prompts = (yaml.safe_load(recipe_yaml or "") or {}).get("test_prompts") or []
        return ["\n".join(p[k] for k in ("system", "instruction", "input") if p.get(k)) for p in prompts]
    except (yaml.YAMLError, AttributeError, TypeError):
        return []


def _recipe_fields(recipe_yaml: str | None) -> dict[str, Any] | None:
    import yaml

    try:
        doc = yaml.safe_load(recipe_yaml or "") or {}
        lora = doc["lora"]
        return {"r": int(lora["r"]), "targets": list(lora["target_modules"])}
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


# --- the page -------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= step * m)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def svg_chart(title: str, series: list[tuple[str, list[tuple[float, float]], str]], y_label: str, chart_id: str) -> str:
    """A line chart (markers on each point) of one or more series of (x, y), as inline SVG."""
    points = [p for _, pts, _ in series for p in pts if p[1] is not None and math.isfinite(p[1])]
    if not points:
        return ""
    w, h, left, right, top, bottom = 560, 260, 70, 16, 28, 36
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (h - top - bottom)

    out = [f'<svg id="{chart_id}" class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="16" class="title">{_e(title)}</text>']  # fmt: skip
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" class="tick" text-anchor="end">{t:.4g}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{h - bottom + 16}" class="tick" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 4}" class="axis" text-anchor="middle">step</text>')
    out.append(f'<text x="14" y="{(top + h - bottom) / 2}" class="axis" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + h - bottom) / 2})">{_e(y_label)}</text>')  # fmt: skip
    for i, (name, pts, colour) in enumerate(series):
        good = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if not good:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6" class="series" '
                   f'data-series="{_e(name)}"/>')  # fmt: skip
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.4" fill="{colour}"/>' for x, y in good]
        lx = w - right - 150
        out.append(f'<rect x="{lx}" y="{top + 4 + i * 16}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{top + 13 + i * 16}" class="tick">{_e(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans CJK SC","WenQuanYi Micro Hei",
sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
main{max-width:1120px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub{color:#57606a}.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff}
.succeeded{background:#1a7f37}.failed{background:#cf222e}.running,.pending{background:#9a6700}
.unknown,.cancelled,.stopped{background:#57606a}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin-top:16px}
.tile{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px}
.tile .k{color:#57606a;font-size:12px}.tile .v{font-size:20px;font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d0d7de}
th,td{border-bottom:1px solid #d0d7de;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:12px}
.chart{background:#fff;border:1px solid #d0d7de;border-radius:8px;width:100%;height:auto}
.chart .title{font-weight:600;font-size:13px}.chart .tick{font-size:11px;fill:#57606a}
.chart .axis{font-size:11px;fill:#57606a}.chart .grid{stroke:#eaeef2}
#answers{table-layout:fixed}#answers th:first-child{width:28%}
pre{background:#fff;border:1px solid #d0d7de;padding:10px;overflow:auto;white-space:pre-wrap}
.answer{white-space:pre-wrap}.note{color:#57606a;font-size:12px}
"""


def _table(head: list[str], rows: list[list[str]], table_id: str, numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _gguf_row(q: dict[str, Any]) -> list[str]:
    stop = f" <span class=note>({_e(q['smoke_finish'])}, {_e(q['smoke_tokens'])} tokens)</span>"
    top1 = f"{100 * q['top1']:.1f}%" if q.get("top1") is not None else _e(q.get("fidelity_error") or "–")
    answer = f"<span class=answer>{_e(q['smoke_answer'])}</span>{stop}"
    figures = [_num(q["perplexity"], 5), _num(q["kld"], 3), _num(q["kld_p99"], 3), top1]
    return [f"<b>{_e(q['type'])}</b>", _num(q["size_mib"], 5), answer, *figures]


def _answer_row(a: dict[str, Any]) -> list[str]:
    def answer(text: Any, stopped: Any) -> str:
        return f"<span class=answer>{_e(text)}</span>" + ("" if stopped else " <span class=note>(no stop)</span>")

    rendered = f"<details><summary class=note>as rendered</summary><pre>{_e(a['prompt'])}</pre></details>"
    asked = f"<span class=answer>{_e(a.get('asked') or a['prompt'])}</span>{rendered}"
    return [asked, answer(a["before"], a.get("before_stopped")), answer(a["after"], a.get("after_stopped"))]


def _stage_row(st: dict[str, Any]) -> list[str]:
    phases = ", ".join(f"{_e(k)} {v:g}s" for k, v in (st.get("phases") or {}).items())
    notes = "".join(f"<div class=note>{_e(n)}</div>" for n in [*st["notes"], *([st["error"]] if st["error"] else [])])
    state = f'<span class="badge {_e(st["state"])}">{_e(st["state"])}</span>'
    seconds = _num(st["seconds"], 5)
    if st.get("attempts", 1) > 1:
        earlier = f", {_num(st['earlier_seconds'], 4)} s before" if st.get("earlier_seconds") else ""
        seconds += f"<div class=note>{_e(st['attempts'])} attempts{earlier}</div>"
    return [f"<b>{_e(st['stage'])}</b>", state, seconds, _e(st["gpus"]), phases + notes]


def render_html(doc: dict[str, Any]) -> str:
    t = doc.get("training") or {}
    ev = (t.get("eval") or {}).get("history") or []
    tiles = []
    if t.get("first_loss") is not None:
        tiles.append(("training loss", f"{_num(t['first_loss'])} → {_num(t['final_loss'])}"))
    if ev:
        tiles.append(("held-out perplexity", f"{_num(ev[0]['perplexity'])} → {_num(ev[-1]['perplexity'])}"))
    if t.get("tokens_per_s"):
        tiles.append(("tokens / s (training)", _num(t["tokens_per_s"], 5)))
    if t.get("mfu") is not None:
        tiles.append(("MFU (lower bound)", f"{100 * t['mfu']:.1f}%"))
    g = doc.get("gpu") or {}
    tiles.append(("GPU-hours", _num(g.get("gpu_hours"))))
    if g.get("estimated_cost") is not None:
        tiles.append(("estimated cost", f"{g['estimated_cost']:.2f} at {g['price_per_gpu_hour']:g} / GPU-hour"))
    tiles.append(("device", _e(g.get("device") or "–")))
    if g.get("peak_memory_gib") is not None:
        tiles.append(("peak GPU memory", f"{g['peak_memory_gib']:.2f} GiB"))

    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f"<title>tunectl report: {_e(doc['run'])}</title><style>{_CSS}</style></head><body><main>",
        f'<h1>{_e(doc["run"])} <span class="badge {_e(doc["state"])}" id=state>{_e(doc["state"])}</span></h1>',
        f"<div class=sub>recipe <b>{_e(doc['recipe'])}</b> · {_e(doc['backend'])} backend · created "
        f"{_e(doc['created'])} · store {_e(doc.get('store'))}</div>",
        '<div class="tiles" id=summary>'
        + "".join(f"<div class=tile><div class=k>{k}</div><div class=v>{v}</div></div>" for k, v in tiles)
        + "</div>",
    ]
    losses = t.get("losses") or []
    if losses:
        parts.append("<h2>Training</h2><div class=charts>")
        series = [("training", [(h["step"], h["loss"]) for h in losses], "#0969da")]
        if ev:
            series.append(("held-out", [(e["step"], e["loss"]) for e in ev], "#bc4c00"))
        parts.append(svg_chart("Loss", series, "loss", "loss-chart"))
        lr = [(h["step"], h.get("learning_rate")) for h in losses]
        parts.append(svg_chart("Learning rate", [("learning rate", lr, "#8250df")], "learning rate", "lr-chart"))
        gn = [(h["step"], h.get("grad_norm")) for h in losses]
        parts.append(svg_chart("Gradient norm", [("grad norm", gn, "#1a7f37")], "norm", "grad-chart"))
        parts.append("</div>")
        if ev:
            src = (t.get("eval") or {}).get("rows")
            parts.append(f"<p class=note>Held-out: {_e(src)} rows not trained on; perplexity is exp of the mean loss "
                         "per token on the tokens training puts its loss on.</p>")  # fmt: skip
    if doc.get("answers"):
        rows = [_answer_row(a) for a in doc["answers"]]
        parts.append("<h2>Answers before and after training</h2>")
        parts.append(_table(["prompt", "before", "after"], rows, "answers"))
    if doc.get("gguf"):
        ref = doc.get("fidelity_reference")
        head = ["type", "size (MiB)", "smoke answer", "perplexity", f"KL divergence from {_e(ref or 'f16')}",
                "KLD p99", "same top token"]  # fmt: skip
        rows = [_gguf_row(q) for q in doc["gguf"]]
        parts.append("<h2>GGUF files</h2>")
        parts.append(_table(head, rows, "gguf-table", numeric={1, 3, 4, 5, 6}))
        if doc.get("fidelity_rows"):
            parts.append(f"<p class=note>Measured with llama.cpp on the {_e(doc['fidelity_rows'])} rows' tokens "
                         f"against the {_e(ref)} file.</p>")  # fmt: skip
    rows = [_stage_row(st) for st in doc["stages"]]
    parts.append("<h2>Stages</h2>")
    parts.append(_table(["stage", "state", "seconds", "GPUs", "phases (s)"], rows, "stages", numeric={2, 3}))
    lin = doc.get("lineage") or {}
    rows = [[_e(k), f"<code>{_e(v)}</code>"] for k, v in lin.items() if k != "versions"]
    rows += [[_e(k), f"<code>{_e(v)}</code>"] for k, v in (lin.get("versions") or {}).items()]
    parts.append("<h2>Lineage</h2>")
    parts.append(_table(["what", "value"], rows, "lineage"))
    if doc.get("recipe_yaml"):
        parts.append(f"<details><summary>Recipe</summary><pre>{_e(doc['recipe_yaml'])}</pre></details>")
    parts.append(f"<p class=note>{_e(doc['report_by'])}</p></main></body></html>")
    return "\n".join(parts)
