"""A broken machine is told apart from bad input (issue 13, item 9): one line, exit 74, the setting to fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import one_line_error

from tunectl.errors import EXIT_CONFIG_ERROR, EXIT_ENVIRONMENT


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunectl.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


@pytest.mark.parametrize("where", ["missing", "not-executable", "directory"])
def test_a_wrong_helm_path_names_the_setting(tmp_path, where):
    helm = tmp_path / "helm"
    if where == "not-executable":
        helm.write_text("#!/bin/sh\n")
    elif where == "directory":
        helm.mkdir()
    proc = cli("--store", "s3://bucket/runs", "render", "ruozhiba-tiny", TUNECTL_HELM=str(helm))
    line = one_line_error(proc, EXIT_ENVIRONMENT)
    assert f"TUNECTL_HELM={helm}" in line and "point it at Helm 3 or unset it" in line


def test_a_bad_namespace_is_one_line_before_any_cluster_call(tmp_path):
    # No kubeconfig at all: the namespace is refused first, not the missing kubeconfig, and no API call is made.
    proc = cli(
        "status",
        "some-run-20261206-000000-abcd",
        "--backend",
        "kubernetes",
        "-n",
        "Bad_NS",
        KUBECONFIG=str(tmp_path / "none"),
    )
    assert "namespace 'Bad_NS' must be a DNS-1123 label" in one_line_error(proc, EXIT_CONFIG_ERROR)


@pytest.mark.parametrize("run", ["../../etc", "a/b", "UPPER", "x" * 64])
def test_a_run_argument_is_a_run_id_never_a_path(tmp_path, run):
    proc = cli("status", run, "--backend", "local", TUNECTL_STORE=str(tmp_path / "store"))
    assert "is not a run id" in one_line_error(proc, EXIT_CONFIG_ERROR)
    assert not (tmp_path / "store").exists()


def test_usage_errors_are_one_line_too():
    proc = cli("render", "ruozhiba-tiny", "--stor", "x")
    line = one_line_error(proc, 2)
    assert "No such option '--stor'" in line and "(see 'tunectl render --help')" in line
