"""Training hooks for DCLS models."""
from .atomic_checkpoint_hook import AtomicCheckpointHook, find_resumable_checkpoint
from .clamp_positions_hook import ClampPositionsHook
from .repulsive_loss_hook import RepulsiveLossHook
from .rng_state_hook import RNGStateHook, get_rng_state, set_rng_state, use_reliable_hooks

__all__ = [
    'ClampPositionsHook', 'RepulsiveLossHook', 'AtomicCheckpointHook', 'RNGStateHook',
    'find_resumable_checkpoint', 'get_rng_state', 'set_rng_state',
    'use_reliable_hooks'
]
