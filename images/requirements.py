"""Print the pinned requirements of tunectl (or one of its extras) from pyproject.toml, one per line.

The Dockerfiles install these before copying the source, so a code change does not reinstall anything:
    python3 images/requirements.py train gguf > /tmp/requirements.txt
    python3 images/requirements.py --version-of torch       # 2.11.0 (images/build.sh passes it to images/torch)
"""

import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
lines = list(project["dependencies"])
if sys.argv[1:2] == ["--version-of"]:
    pins = [r for extra in project["optional-dependencies"].values() for r in extra] + lines
    name = sys.argv[2]
    print(next(r.split("==", 1)[1] for r in pins if r.split("==", 1)[0].strip() == name))
    sys.exit()
for extra in sys.argv[1:]:
    lines += project["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(lines)))
