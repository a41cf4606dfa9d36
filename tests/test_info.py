"""`os info`: the real CLI in a subprocess, on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def _os(*args: str) -> subprocess.CompletedProcess:
    code = "from opensloth.cli.main import app; app()"
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=120)


def test_os_info_json_reports_versions_devices_and_components():
    result = _os("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["python"] == sys.version.split()[0]
    assert info["devices"]["cuda_available"] == torch.cuda.is_available()
    assert info["devices"]["cpu_cores"] >= 1
    assert info["backends"]["hf"]["usable"] is True
    assert info["rollout_engines"]["hf"]["usable"] is True
    if not torch.cuda.is_available():
        assert info["backends"]["unsloth"] == {"usable": False, "detail": "no CUDA device"}
        assert info["devices"]["gpus"] == []


def test_os_info_tables():
    result = _os("info")
    assert result.returncode == 0, result.stderr
    for heading in ("Versions", "Devices", "Components", "transformers", "unsloth", "vllm"):
        assert heading in result.stdout


def test_os_info_shows_the_code_sandbox_level():
    from opensloth.rewards.sandbox import sandbox_isolated

    info = json.loads(_os("info", "--json").stdout)["sandbox"]
    assert info["namespaces"] is sandbox_isolated()
    expected = "namespaces (net, pid, mount, ipc, uts)" if info["namespaces"] else "rlimits + "
    assert info["level"].startswith(expected), info
    assert "rlimits" in info["level"]
    table = _os("info").stdout
    assert "code sandbox" in table
    code = "from opensloth.cli.main import app; app()"
    degraded = subprocess.run([sys.executable, "-c", code, "info", "--json"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OPENSLOTH_SANDBOX_NAMESPACES": "0"})
    level = json.loads(degraded.stdout)["sandbox"]
    assert level["namespaces"] is False
    assert level["level"].endswith("audit hook only (no namespaces: turned off by OPENSLOTH_SANDBOX_NAMESPACES=0)")
    # As root without namespaces, `nobody` cannot run an interpreter under /root: the system one runs model
    # code, and os info says so and what it lacks.
    if os.geteuid() == 0 and sys.executable.startswith("/root/"):
        assert level["same_interpreter"] is False
        assert "not the trainer's" in level["interpreter"], level


def test_os_info_names_the_interpreter_that_runs_model_code():
    from opensloth.rewards.sandbox import sandbox_isolated

    info = json.loads(_os("info", "--json").stdout)["sandbox"]
    if sandbox_isolated():  # namespaces: the trainer's own interpreter, even as root under /root
        assert info["same_interpreter"] is True, info
        assert info["interpreter"].startswith(f"the trainer's own: {sys.executable} (Python {sys.version.split()[0]}")
    assert "interpreter" in _os("info").stdout
