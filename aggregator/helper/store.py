"""The helper's memory on disk: what it answered (``HelperRules.state``), one JSON file.

Written to a temporary file in the same folder, fsynced, renamed over ``answered.json``, and
the folder fsynced: a crash at any moment leaves the old file or the new one, never a mix.
The helper acks a request only after this returns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from messages.errors import ConfigError, StateError

FILE = "answered.json"


class HelperStore:
    """``state_dir/answered.json``: load at start, save before every answer."""

    def __init__(self, state_dir: str | Path) -> None:
        self.directory = Path(state_dir)
        self.path = self.directory / FILE

    def load(self) -> dict[str, Any] | None:
        """The saved state, ``None`` when there is none yet; ``ConfigError`` if unreadable
        (a helper that forgot what it answered could be made to answer twice: it must not
        start)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"helper state {self.path}: {exc.strerror}") from None
        try:
            state = json.loads(text)
            if not isinstance(state, dict) or not {"answered", "replays"} <= state.keys():
                raise ValueError("not a helper state")
        except ValueError as exc:
            raise ConfigError(f"helper state {self.path} is damaged ({exc}); it records what "
                              "the helper answered, so it is not ignored: restore it from a "
                              "backup") from None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Replace the saved state durably; ``StateError`` when it cannot be written."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StateError(f"cannot write the helper state to {self.path}: {exc}; stopping "
                             "(nothing was answered)") from exc
