"""Modelfile TEMPLATEs rendered by Go's own text/template, the engine Ollama executes them with (`go run`; Go
builds the test tools, so it is here wherever the slow tier runs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

# Each case is the data the template sees: {"System", "Prompt"} for /api/generate, {"Messages": [{"Role",
# "Content"}, ...]} for /api/chat. Every key a template reads must be given (an absent one renders "<no value>").
RENDER_GO = """
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

func main() {
	var in struct {
		Template string
		Cases    []map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(in.Template))
	out := []string{}
	for _, c := range in.Cases {
		var b strings.Builder
		if err := t.Execute(&b, c); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def go_render(tmp_path: Path, template: str, cases: list[dict[str, Any]]) -> list[str]:
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is needed to render Modelfile templates with Go's own engine (it builds the test tools)")
    (tmp_path / "render.go").write_text(RENDER_GO, encoding="utf-8")
    proc = subprocess.run([go, "run", "render.go"], input=json.dumps({"Template": template, "Cases": cases}),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))
