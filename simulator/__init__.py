"""Offline fleet simulation: the real scheduler, block pool, prefix index and policies on a
virtual clock (no sockets, no torch)."""
