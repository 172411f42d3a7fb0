"""The built wheel carries what an installed tunectl needs outside its Python files: the recipes, their
sample data and the Helm chart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_installed_wheel_has_recipes_sample_data_and_chart(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tunectl-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = """
import json, tunectl
from tunectl.recipe import load_recipe
from tunectl.render import chart_dir
r = load_recipe("ruozhiba-tiny")
print(json.dumps({"module": tunectl.__file__, "recipe": r.name, "data": r.data.source, "chart": str(chart_dir())}))
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("TUNECTL_CHART", None)
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True, capture_output=True, text=True
    )
    got = json.loads(out.stdout)
    assert Path(got["module"]).is_relative_to(site)  # the wheel's copy, not the checkout's
    assert got["recipe"] == "ruozhiba-tiny"
    chart = Path(got["chart"])
    assert chart.is_relative_to(site)
    for rel in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "templates/stage-jobs.yaml",
        "templates/_helpers.tpl",
    ):
        assert (chart / rel).is_file(), rel
    assert list((site / "tunectl" / "recipes" / "data").glob("*.jsonl"))
