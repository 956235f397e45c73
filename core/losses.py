"""The stable import path of the loss contract: `core.losses.catnip_loss(logits, labels,
beta=..., token_stride=1)`. The losses live in `core.engine.losses`."""

from core.engine.losses import *  # noqa: F403
from core.engine.losses import __all__  # noqa: F401
