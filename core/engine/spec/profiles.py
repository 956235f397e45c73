"""Profiles: named sets of defaults a job spec starts from (`"profile": "robust"`).

A profile fills what the spec leaves out; a field the spec names wins. `standard` adds
nothing. `robust` is the recipe `unlearn bench --recipes` measured best on the demo
(docs/methods.md, "The robust profile"): a KL retain term on retain data from the forget
set's own domain, selective updates (the forget gradient projected off the retain data's
principal input directions), then the distillation stage. It needs a retain_file (the
in-domain neighbours belong there) and a distill_file.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from core.errors import SpecError

Profile = Literal["standard", "robust"]

ROBUST: dict[str, Any] = {
    "hyperparameters": {"retain_loss": "kl", "selective": {"mode": "project"}},
    "robustify": {
        "alpha": 0.6,
        "steps": 1000,
        "learning_rate": 3e-3,
        "batch_size": 32,
        "probe_every": 50,
    },
}

_NEEDS = {
    "retain_file": "retain data from the forget set's own domain (its neighbours) and "
    "general data, for the KL retain term and the directions selective updates keep",
    "distill_file": "a distillation set (purpose distill): retain and general text, never "
    "the forget set",
}


def _merged(defaults: dict[str, Any], given: Any) -> Any:
    """`given` over `defaults`, key by key for mappings (a None in `given` keeps null)."""
    if not isinstance(given, dict):
        return copy.deepcopy(defaults) if given is None else given
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        out[key] = (
            _merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def apply_profile(data: dict[str, Any]) -> dict[str, Any]:
    """The raw spec with its profile's defaults filled in; SpecError naming the field a
    profile needs and the spec lacks."""
    profile = data.get("profile", "standard")
    if profile != "robust":
        return data
    missing = [name for name in _NEEDS if not data.get(name)]
    if missing:
        name = missing[0]
        raise SpecError(f'{name}: profile "robust" needs {_NEEDS[name]}', param=name)
    out = dict(data)
    for key, defaults in ROBUST.items():
        out[key] = _merged(defaults, data.get(key))
    return out
