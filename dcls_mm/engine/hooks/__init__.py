"""Training hooks for DCLS models."""
from .clamp_positions_hook import ClampPositionsHook
from .repulsive_loss_hook import RepulsiveLossHook

__all__ = ['ClampPositionsHook', 'RepulsiveLossHook']
