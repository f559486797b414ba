"""Memory that outlives one call: the server's budgeted KV cache (and, later, client histories)."""

from swarm.cache.kv import CacheFullError, KVCacheBudget, SessionKV

__all__ = ["CacheFullError", "KVCacheBudget", "SessionKV"]
