"""The semantic cache's model is the one inside the installed wheel: it loads and embeds in a
process that has no network at all (a network namespace of its own, ``unshare -n``), with
``HF_HUB_OFFLINE`` not set by anyone but TARS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.semantic_support import needs_extra

pytestmark = [pytest.mark.integration, needs_extra]

SCRIPT = """
import socket
try:
    socket.create_connection(("pypi.org", 443), timeout=3)
    print("NETWORK")
except OSError:
    print("NO-NETWORK")
from tars_tasks.embedding import embed
print(embed(["What is the capital of Italy?"]).shape)
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs unshare and root for a network namespace")
def test_the_model_loads_and_embeds_without_any_network():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["NO-NETWORK", "(1,", "384)"]
