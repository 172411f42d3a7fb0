"""The Ollama build's proof (tests/ollama/build.sh runs it): a fresh server on 127.0.0.1 loads a small quantized
GGUF and answers a prompt of a few dozen tokens; a build that cannot is a failed build. Prints the CPU backend
library the server chose at run time.

    python3 tests/ollama/check.py OLLAMA_BINARY GGUF
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for ollama_server
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs" / "tunectl_jobs"))  # llamarun, standalone

from llamarun import CHECK_PROMPT  # noqa: E402
from ollama_server import OllamaServer  # noqa: E402


def main(binary: str, gguf: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="ollama-check-") as tmp:
        server = OllamaServer(binary, Path(tmp))
        server.start()
        try:
            (Path(tmp) / "Modelfile").write_text(f"FROM {gguf.resolve()}\n")
            created = server.run("create", "build-check", "-f", str(Path(tmp) / "Modelfile"))
            if created.returncode != 0:
                print(f"ollama check: create failed: {created.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            body = {
                "model": "build-check",
                "prompt": CHECK_PROMPT,
                "raw": True,
                "stream": False,
                "options": {"num_predict": 24, "temperature": 0, "seed": 0},
            }
            req = urllib.request.Request(f"{server.url}/api/generate", json.dumps(body).encode(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    out = json.loads(r.read())
            except OSError as e:
                log = (Path(tmp) / "serve.log").read_text(errors="replace")
                print(f"ollama check: generate failed ({e}); server log tail:\n{log[-1500:]}", file=sys.stderr)
                return 1
        finally:
            server.stop()
        log = (Path(tmp) / "serve.log").read_text(errors="replace")
    backend = re.findall(r"loaded CPU backend from (\S+)", log)
    if not out.get("eval_count") or not out.get("response", "").strip():
        print(f"ollama check: no answer from {gguf.name}: {json.dumps(out)[:500]}", file=sys.stderr)
        return 1
    print(
        f"ollama check: {gguf.name} answered {out['eval_count']} tokens to a {out.get('prompt_eval_count')}-token "
        f"prompt; CPU backend {Path(backend[-1]).name if backend else 'compiled in (no SIMD library loaded)'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
