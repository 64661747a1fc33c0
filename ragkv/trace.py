"""What one generation did: per-chunk hits, recompute counts and measured times."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ChunkTrace:
    # The entry this prompt position reads (``KeySpace.at``). With anchor precompute the first
    # chunk reads its prefix-context entry, so its key is not the chunk's retrieval key
    # (``RetrievedChunk.key``, a Document's or node's ``ragkv_key``): match a source by
    # position (``start``) or document, not by key.
    key: str
    n_tokens: int
    hit: bool | None  # None: the mode never looked this chunk up (full; prefix past chunk 1)
    start: int  # position of the chunk's first token in the assembled prompt
    document: str | None = None
    recomputed: int = 0  # tokens of this chunk recomputed at the last layer
    tier: str | None = None  # the cache tier that served a hit: memory, disk or remote


@dataclass
class QueryTrace:
    """What one answer cost and reused, filled by the engine that served it (every engine
    fills the same fields).

    ttft_s is measured from the request (question + chunk keys) to the first token where the
    request is made (the app process, also for a served engine) and includes index lookup,
    blob loading and fusion; retrieval is reported separately. engine_ttft_s is the engine's
    own figure where it reports one (vLLM: from scheduling the request to its first token).
    """

    mode: str
    ratio: float | None
    policy: str | None
    context_tokens: int  # tokens in the assembled prompt
    chunks: list[ChunkTrace] = field(default_factory=list)
    recomputed_per_layer: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    lookup_s: float = 0.0
    load_s: float = 0.0
    precompute_s: float = 0.0  # time spent computing chunks that missed, inside ttft
    #: the engine computing the prompt, inside ttft: the fusion (reuse, blend) or the whole
    #: prefill (full, prefix; on vLLM its own figure where it reports one, as a server does,
    #: else the part of ttft not spent on lookup, loading or precompute)
    fuse_s: float = 0.0
    retrieval_s: float | None = None
    full_ttft_s: float | None = None
    engine: str = ""  # which engine answered, for people
    engine_ttft_s: float | None = None
    #: what went wrong and what was done instead (the answer is then full prefill's)
    error: str | None = None
    #: positions computed at each layer, when recording was asked for (inspection)
    layer_sets: list[list[int]] | None = None
    #: tokens the quality guard (``BlendConfig.coverage``) recomputed beyond the ratio's budget
    #: (negative: tokens a per-prompt budget, ``floor_ratio``, spared)
    guard_tokens: int = 0
    #: retrieved chunks that did not fit the model's window (in rank order)
    left_out: list[ChunkTrace] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return sum(c.hit is True for c in self.chunks)

    @property
    def misses(self) -> int:
        return sum(c.hit is False for c in self.chunks)

    @property
    def tiers(self) -> list[str]:
        """The cache tiers that served this answer's chunks, sorted (none: all computed)."""
        return sorted({c.tier for c in self.chunks if c.tier})

    @property
    def recomputed_tokens(self) -> int:
        """Tokens computed at the deepest layer (the figure that sets the cost)."""
        return self.recomputed_per_layer[-1] if self.recomputed_per_layer else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("layer_sets")
        d.update(hits=self.hits, misses=self.misses, recomputed_tokens=self.recomputed_tokens)
        return d
