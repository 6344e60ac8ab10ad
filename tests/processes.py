"""Running ``dfl`` commands as real processes in tests, with their logs kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

TEST_SETTINGS = frozenset({"DFL_TEST_AMQP_URL", "DFL_TEST_MANAGEMENT_URL",
                           "DFL_TEST_RABBITMQ_BIN", "DFL_FUZZ_EXAMPLES"})
"""The ``DFL_*`` variables meant for the test suite itself; every other one is the user's."""


def users_settings(environ: Mapping[str, str]) -> list[str]:
    """The ``DFL_*`` daemon settings in ``environ``, which no test may inherit (the suite must
    pass whatever the user's shell exports, ``DFL_DATA_DIR`` included)."""
    return [name for name in environ if name.startswith("DFL_") and name not in TEST_SETTINGS]


_HIDDEN = set(users_settings(os.environ))
ENV = {**{k: v for k, v in os.environ.items() if k not in _HIDDEN},
       "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def dfl() -> str:
    """The installed ``dfl`` console command (beside this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "dfl"
    found = str(beside) if beside.exists() else shutil.which("dfl")
    assert found, "the dfl console command is not installed (pip install -e .)"
    return found


class Procs:
    """Named ``dfl`` processes whose output goes to ``<tmp>/<name>.log``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[str]:
        """Start ``dfl ARGS`` as ``name``; ``env`` adds variables to the environment."""
        log = (self.tmp / f"{name}.log").open("a")
        p = subprocess.Popen([dfl(), *args], stdout=log, stderr=subprocess.STDOUT, text=True,
                             env={**ENV, **(env or {})})
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_until(self, what: str, done: Callable[[], bool], timeout: float) -> float:
        """Poll ``done()``; fail with every process's log tail after ``timeout`` seconds.

        Returns the monotonic time at which it became true.
        """
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)[-2500:]}" for n in self.procs)
                pytest.fail(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.2)
        return time.monotonic()

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
