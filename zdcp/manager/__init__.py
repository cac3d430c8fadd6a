"""``zdcp.CheckpointManager`` (:mod:`~zdcp.manager.checkpoint_manager`) and its parts: when to
save and what to keep (:mod:`~zdcp.manager.policies`), a preemption agreed across ranks
(:mod:`~zdcp.manager.preemption`), and the committed steps (:mod:`~zdcp.manager.step_index`)."""

from .checkpoint_manager import CheckpointManager
from .policies import retained_steps

__all__ = ["CheckpointManager", "retained_steps"]
