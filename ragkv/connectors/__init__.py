"""Bridges between ragkv and the outside world: retrieval, RAG frameworks, serving engines."""
