"""Tokens shared by replicas through Redis (docs/replicas.md): the store (redis_store.py)
and the encryption of what it stores (sealing.py)."""
