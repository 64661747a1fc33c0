"""Alembic migrations of the cache index, applied by :func:`ragkv.cache_index.migrate.upgrade`."""
