"""What a failed job's message may say of the worker's filesystem. Tenants name models,
they do not see the operator's paths: a path under the job's model or inputs is named by
what the tenant knows (model 'name', <inputs>), one under the work directory is <work>,
any other absolute path (the store, a cache, a library's) is <path>."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# An absolute POSIX path, not part of a URL or a relative path: what a message may carry
# of the worker's filesystem.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:~/>-])/[^\s'\"(),;:\[\]{}<>]+")


@dataclass
class Redactions:
    """One job's paths and what a message shows in their place (`known`); the rest of
    `work_dir` is shown as <work>, any other absolute path as <path>."""

    work_dir: Path
    known: dict[str, str] = field(default_factory=dict)

    def add(self, path: str | Path, shown: str) -> None:
        """Show `path`, and anything under it, as `shown`."""
        self.known[str(path)] = shown

    def redact(self, message: str) -> str:
        """`message` with every absolute path replaced, the longest known prefix first."""
        known = {**self.known, str(self.work_dir): "<work>"}
        prefixes = sorted(known.items(), key=lambda item: -len(item[0]))

        def one(match: re.Match[str]) -> str:
            path = match.group(0)
            for secret, shown in prefixes:
                if path == secret or path.startswith(secret.rstrip("/") + "/"):
                    return shown + path[len(secret) :]
            return "<path>"

        return _ABSOLUTE_PATH.sub(one, message)
