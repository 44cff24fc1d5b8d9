"""Checkpoints: the orbax manager for train states (`manager`), preemption saves (`preemption`)."""

from jaxnv.checkpoint.manager import Checkpointer, CheckpointError

__all__ = ["CheckpointError", "Checkpointer"]
