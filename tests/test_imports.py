"""The architecture's import rules hold for every module of the package (tests/import_rules.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.import_rules import static_violations

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_imports_in_a_fresh_interpreter_and_follows_the_rules():
    # The script checks the source's import graph, then imports every module in fresh
    # interpreters and looks at what got loaded.
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "import_rules.py"), str(ROOT)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_rules_catch_forbidden_imports_and_hidden_cycles(tmp_path):
    _write(tmp_path, {
        "shared/__init__.py": "",
        "shared/tasks/__init__.py": "",
        "shared/tasks/net.py": "import flwr.app\n",
        # A cycle hidden behind a function-local import is still a cycle.
        "shared/a.py": "def f():\n    from fedscan.shared.b import g\n",
        "shared/b.py": "from fedscan.shared.a import f\nimport fedscan.server.app\n",
        "server/__init__.py": "",
        "server/app.py": "from fedscan.client.x import y\nimport opacus\n",
        "client/__init__.py": "",
        # Opacus belongs here; a TYPE_CHECKING import is not an import at run time.
        "client/x.py": ("from typing import TYPE_CHECKING\nimport opacus\n"
                        "if TYPE_CHECKING:\n    from fedscan.server.app import z\n"),
    })
    assert set(static_violations(tmp_path)) == {
        "fedscan.shared.tasks.net imports flwr.app: task code imports no Flower",
        "fedscan.shared.b imports fedscan.server: shared/ imports no actor",
        "fedscan.shared.b imports fedscan.server.app: shared/ imports no actor",
        "fedscan.server.app imports fedscan.client: server and client never import each other",
        "fedscan.server.app imports fedscan.client.x: server and client never import each other",
        "fedscan.server.app imports opacus: Opacus only on the client side (client/)",
        "import cycle: fedscan.shared.a -> fedscan.shared.b",
    }
