"""Engine backends, KV containers, RoPE re-encoding and the CacheBlend fusion."""
