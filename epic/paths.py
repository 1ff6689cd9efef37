"""Paths in configs: environment variables (`${EPIC_DATA}/cc3m`), expanded with an error that names the variable."""
from __future__ import annotations

import os
import re

from epic.config import ConfigError

_ENV_VAR = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_env(text: str, what: str) -> str:
    """`${EPIC_DATA}/cc3m` -> `/data/cc3m`; an unset variable is an error naming it."""
    def substitute(match):
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise ConfigError(f"{what}: environment variable ${name} is not set (used in '{text}'). "
                              f"Export it, e.g. `export {name}=/path/...`, or give the path directly.")
        return os.environ[name]

    return _ENV_VAR.sub(substitute, text)
