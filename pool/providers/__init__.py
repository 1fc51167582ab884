"""Implementations of :class:`aldaas.pool.Provider`, one sub-package each (local, kubernetes)."""
