"""Print the pinned requirements of tunectl (or one of its extras) from pyproject.toml, one per line.

The Dockerfiles install these before copying the source, so a code change does not reinstall torch:
    python3 images/requirements.py train gguf > /tmp/requirements.txt
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
lines = list(project["dependencies"])
for extra in sys.argv[1:]:
    lines += project["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(lines)))
