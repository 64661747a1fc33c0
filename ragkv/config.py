"""The one typed configuration object of ragkv.

Everything configurable lives here and is passed explicitly; nothing is read from environment
variables except ``RAGKV_HOME`` as the default home folder (a convenience for the CLI).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from ragkv.checks import as_python, is_number, is_whole

Mode = Literal["full", "prefix", "reuse", "blend"]
MODES: tuple[str, ...] = ("full", "prefix", "reuse", "blend")
PrecomputeContext = Literal["cold", "prefix", "anchor"]
PRECOMPUTE_CONTEXTS: tuple[str, ...] = ("cold", "prefix", "anchor")
#: the SQLite index in a home, unless ``index_url`` names another
INDEX_FILE = "index.sqlite"
#: The index setting naming the precompute context of the cache's last ingestion by the CLI:
#: what `ragkv ask` reads chunks in unless told (its keys are the ones stored).
INGESTED_CONTEXT = "ingested_context"
#: corrections of the KV the blend keeps from the cache (``ragkv.engine.correction``)
CORRECTIONS: tuple[str, ...] = ("none", "chunk_mean", "local_mean")
#: selection policies a BlendConfig may name, in ragkv.engine.policies's order (it registers one
#: class under each; named here so a config is checked without importing torch)
POLICIES: tuple[str, ...] = ("hkvd", "gradual", "chunk_head", "hkvd+head", "qhkvd")
#: in-process engines by name; any http(s):// URL names a served vLLM
ENGINES: tuple[str, ...] = ("hf", "vllm")
#: the blend's default budget and check layer, chosen on the even cases of both public sets
#: (``benchmarks/selection_lab.py``): deviation read at layer 2 ranks the tokens to recompute
#: better than at layer 1, and 12% from there costs no more than 15% from layer 1
DEFAULT_RATIO = 0.12
DEFAULT_CHECK_LAYERS: tuple[int, ...] = (2,)
#: the preselection factor (``BlendConfig.preselect``) of the default from ``PRESELECT_FROM``
#: tokens, and of the front ends' faster blend: four times the ratio, weighted by the question
#: with ``qhkvd``, kept both public sets' figures at about an eighth less TTFT (README)
FAST_PRESELECT = 4.0
#: prompts of at least this many tokens get that preselection by default
#: (``BlendConfig.preselect_from``). Measured with it from about 400 tokens on both public sets
#: (two-chunk cases of 395-1,133 tokens, the sets themselves 1.5k-3.8k, their long cases
#: 4.2k-7.4k): the same fidelity and a lower TTFT at every length (docs/benchmarks.md, *Short
#: prompts*); under about 400 tokens it gained nothing, so shorter prompts compute every token
#: before the check
PRESELECT_FROM = 512
#: with ``preselect_by="auto"``, prompts of at least this many tokens preselect by context
#: scores alone: the question's weighting keeps late tokens, whose attention over a long prompt
#: costs most, so there it gave up the x5 at 8k tokens the scores alone keep, for a lower KL on
#: pydoc's long cases (docs/benchmarks.md, *The question-weighted preselection by default*)
CONTEXT_PRESELECT_FROM = 4096
#: what ``BlendConfig.preselect_by`` may name
PRESELECT_BY = ("auto", "question", "context")


def masked_url(url: str) -> str:
    """A cache URL as it may be shown: no password; a SQLite path made absolute."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - a folder or fsspec URL: shown as given
        return str(Path(url).expanduser().resolve()) if "://" not in url else url
    if u.get_backend_name() == "sqlite" and u.database:
        return f"sqlite:///{Path(u.database).expanduser().resolve()}"
    return u.render_as_string(hide_password=True)


def default_home() -> Path:
    # an empty variable is an unset one: as a path it would name the working directory
    return Path(os.environ.get("RAGKV_HOME") or Path.home() / ".cache" / "ragkv").expanduser()


#: torch device types a ``device`` may name (with an index: ``cuda:1``), or ``auto``
DEVICE = re.compile(r"auto|(cpu|cuda|mps|xpu|hip|hpu|npu|mtia|meta)(:\d+)?")


@dataclass
class BlendConfig:
    """How ``blend`` picks the tokens it recomputes.

    ratio: fraction of chunk tokens recomputed from the first check layer on (0 = ``reuse``,
        1 = every token, which must equal full prefill), or ``"auto"``: the engine's loading
        controller picks the largest ratio whose recompute hides under loading the cached KV,
        never below ``min_ratio``. A number set here always wins.
    policy: name of a selection policy in :mod:`ragkv.engine.policies` (``qhkvd``, ``hkvd``,
        ``gradual``, ``chunk_head``, ``hkvd+head``); the default was chosen by the benchmarks
        in ``benchmarks/results/`` (best first-token KL with TTFT >= 4.5x lower, both sets).
    check_layers: layers at which deviation is measured; layers before the first are computed
        for every token (with the default, layers 0 and 1, and layer 2's projections). With
        several, the deviation policies narrow the selection over them: the first keeps
        ``start_factor`` times ``ratio``, the last ``ratio`` (``gradual`` widens one given
        layer to four). A model with fewer layers checks at its last one.
    start_factor: see ``check_layers``.
    preselect: which chunk tokens are computed before the first check layer. None: all of
        them. A number F: only the F x ``ratio`` share whose stored context score is highest,
        so no layer is computed for every token (:mod:`ragkv.engine.context_score`; the score
        is how far a token's keys move between its prefix- and anchor-context entries, stored
        with the anchor entry at ingestion). With ``qhkvd`` each score is weighted by the
        attention the question pays the token, probed over the cached KV before layer 0.
        Chunks whose entry holds no score (another precompute context, an entry computed on a
        query's miss) are computed whole. Faster; see the README for what it costs.
    preselect_from: with ``preselect`` None, a prompt of at least this many tokens
        preselects ``FAST_PRESELECT`` times the ratio anyway (``PRESELECT_FROM``, 512): with the
        question weighting it kept both public sets' fidelity at less TTFT from about 400
        tokens up (docs/benchmarks.md). None: only ``preselect`` decides (every token is
        computed before the check).
    deviation_on: compare cached vs recomputed ``k`` or ``v`` (or ``kv``: both, summed).
    head_tokens: for chunk-head policies, tokens recomputed at the start of every chunk.
    correction: how the KV of tokens not recomputed is corrected at each layer: ``chunk_mean``
        moves it by ``correction_strength`` times the mean drift (fresh - cached) of its
        chunk's recomputed tokens (:mod:`ragkv.engine.correction`); ``local_mean`` by a mix
        of the mean drift of the recomputed tokens within ``correction_window`` positions of
        it (share ``correction_mix``) and its chunk's mean drift; ``none`` keeps it as cached.
    coverage: the quality guard of the deviation policies (``hkvd``, ``qhkvd``, ``hkvd+head``):
        where the tokens ``ratio`` allows hold less than this share of the check layer's
        deviation mass, more are recomputed until they do, up to ``max_ratio``; the trace
        counts the tokens it added (``guard_tokens``). None: off.
    floor_ratio: with ``coverage``, turns the guard into a per-prompt budget: a prompt whose
        deviation mass is concentrated recomputes fewer tokens than ``ratio`` (down to this
        share), one whose mass is spread recomputes more (up to ``max_ratio``); the trace's
        ``guard_tokens`` is then negative when tokens were spared. None: the guard only raises.
    """

    ratio: float | Literal["auto"] = DEFAULT_RATIO
    min_ratio: float = DEFAULT_RATIO
    policy: str = "qhkvd"
    check_layers: tuple[int, ...] = DEFAULT_CHECK_LAYERS
    deviation_on: Literal["k", "v", "kv"] = "k"
    head_tokens: int = 4
    correction: str = "local_mean"
    correction_strength: float = 0.75
    correction_window: int = 16
    correction_mix: float = 0.5
    coverage: float | None = None
    max_ratio: float = 0.5
    floor_ratio: float | None = None
    start_factor: float = 2.0
    preselect: float | None = None
    preselect_from: int | None = PRESELECT_FROM
    preselect_by: Literal["auto", "question", "context"] = "auto"

    def choose(self, ratio: float | Literal["auto"] | None = None,
               policy: str | None = None) -> BlendConfig:
        """This config with the ratio and policy a front end was given, where given (None:
        as configured), checked as any BlendConfig is."""
        return replace(self, ratio=self.ratio if ratio is None else ratio,
                       policy=self.policy if policy is None else policy)

    def __post_init__(self) -> None:
        as_python(self, ("ratio", "min_ratio", "correction_strength", "correction_mix",
                          "coverage", "max_ratio", "floor_ratio", "start_factor", "preselect"),
                   ("head_tokens", "correction_window", "preselect_from"))
        if self.ratio != "auto" and not (is_number(self.ratio) and 0.0 <= self.ratio <= 1.0):
            raise ValueError(f"recompute ratio must be within [0, 1] or 'auto', got "
                             f"{self.ratio!r}")
        if not (is_number(self.min_ratio) and 0.0 <= self.min_ratio <= 1.0):
            raise ValueError(f"min_ratio must be within [0, 1], got {self.min_ratio!r}")
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"unknown selection policy {self.policy!r}; choose from "
                             f"{', '.join(POLICIES)}")
        if is_whole(self.check_layers):  # check_layers=2 for (2,)
            self.check_layers = (self.check_layers,)
        if (not isinstance(self.check_layers, tuple | list) or not self.check_layers
                or not all(is_whole(n) and n >= 1 for n in self.check_layers)):
            raise ValueError(f"check_layers must name layers >= 1 (layer 0 sees no context), "
                             f"e.g. (2,); got {self.check_layers!r}")
        self.check_layers = tuple(sorted({int(n) for n in self.check_layers}))
        if not (is_whole(self.head_tokens) and self.head_tokens >= 0):
            raise ValueError(f"head_tokens must be a whole number of tokens >= 0, got "
                             f"{self.head_tokens!r}")
        if self.deviation_on not in ("k", "v", "kv"):
            raise ValueError(f"deviation_on must be 'k', 'v' or 'kv', got {self.deviation_on!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got "
                             f"{self.correction!r}")
        if not (is_number(self.correction_strength) and 0.0 <= self.correction_strength <= 2.0):
            raise ValueError(f"correction_strength must be a number within [0, 2], got "
                             f"{self.correction_strength!r}")
        if (isinstance(self.correction_window, bool) or not isinstance(self.correction_window, int)
                or self.correction_window < 0):
            raise ValueError(f"correction_window must be a whole number of tokens >= 0, got "
                             f"{self.correction_window!r}")
        if not (is_number(self.correction_mix) and 0.0 <= self.correction_mix <= 1.0):
            raise ValueError(f"correction_mix must be a number within [0, 1], got "
                             f"{self.correction_mix!r}")
        if self.coverage is not None and not (is_number(self.coverage)
                                              and 0.0 < self.coverage <= 1.0):
            raise ValueError(f"coverage must be within (0, 1] or None, got {self.coverage!r}")
        if not (is_number(self.max_ratio) and 0.0 <= self.max_ratio <= 1.0):
            raise ValueError(f"max_ratio must be within [0, 1], got {self.max_ratio!r}")
        if not is_number(self.start_factor) or self.start_factor < 1.0:
            raise ValueError(f"start_factor must be a number >= 1, got {self.start_factor!r}")
        if self.preselect is not None and not (is_number(self.preselect)
                                               and self.preselect >= 1.0):
            raise ValueError(f"preselect must be a number >= 1 or None, got {self.preselect!r}")
        if self.preselect_from is not None and (isinstance(self.preselect_from, bool)
                                                or not isinstance(self.preselect_from, int)
                                                or self.preselect_from < 1):
            raise ValueError(f"preselect_from must be a whole number of tokens >= 1 or None, "
                             f"got {self.preselect_from!r}")
        if self.preselect_by not in PRESELECT_BY:
            raise ValueError(f"preselect_by must be one of {', '.join(PRESELECT_BY)}, got "
                             f"{self.preselect_by!r}")
        if self.floor_ratio is not None and not (is_number(self.floor_ratio)
                                                 and 0.0 <= self.floor_ratio <= 1.0):
            raise ValueError(f"floor_ratio must be within [0, 1] or None, got "
                             f"{self.floor_ratio!r}")
        if self.floor_ratio is not None and self.coverage is None:  # it had no effect
            raise ValueError("floor_ratio sets the budget of the coverage guard; give coverage "
                             "too")


#: RagkvConfig fields an engine is built with: :meth:`ragkv.api.RagKV.with_config` refuses to
#: change them (the engine would go on with the old value under a config naming the new one).
ENGINE_SETTINGS = ("model", "engine", "device", "dtype", "kernels", "system_prompt",
                   "anchor_text", "anchor_source", "kv_dtype", "int8_key_scales",
                   "int8_value_scales", "home", "index_url", "blob_url", "blob_options",
                   "remote_blob_url", "remote_blob_options", "memory_budget_bytes",
                   "disk_budget_bytes", "remote_budget_bytes", "eviction_policy")


@dataclass
class RagkvConfig:
    """Where things live and how chunks are prepared.

    home: folder for the default model, the SQLite index and the blob store.
    model: local transformers model directory; ``None`` means the embedded default (SmolLM2).
    index_url: SQLAlchemy URL of the cache index (default: SQLite in ``home``).
    blob_url: fsspec URL or folder for KV blobs (default: ``home/blobs``); ``s3://bucket/prefix``
        and ``redis://host:port/db[/prefix]`` let several nodes share one cache.
    blob_options: fsspec storage options for ``blob_url`` (e.g. ``{"endpoint_url": ...}`` for
        an S3-compatible server, or Redis client timeouts); S3 also reads the standard AWS
        settings (``AWS_ENDPOINT_URL``, credentials files) on its own.
    chunk_tokens: target chunk size in tokens.
    precompute_context: ``cold`` (each chunk prefilled alone), ``prefix`` (after the shared
        template prefix / system prompt) or ``anchor`` (two entries per chunk: after the
        prefix, read when the chunk comes first in a prompt, and after the prefix and a fixed
        passage, read everywhere else; its KV is closer to the chunk's KV deep in a prompt).
    anchor_text: the passage of ``anchor`` precompute, fixed by hand (None: chosen by
        ``anchor_source``); changing it changes every anchor key.
    anchor_source: where the passage comes from when ``anchor_text`` is None: ``corpus`` (the
        first ingestion into a cache picks its most typical text, :func:`ragkv.anchor.
        corpus_anchor`, and records it in the index; until then, and for corpora under 64
        tokens, the neutral passage) or ``builtin`` (always ragkv's neutral passage,
        :data:`ragkv.anchor.ANCHOR_TEXT`).
    kv_dtype: dtype chunk KV is stored in; ``int8`` quantizes it KIVI-style with float32
        scales per channel (keys) / per token (values) by default, see ``int8_*_scales``.
    memory_budget_bytes: bytes of decoded KV the in-process memory tier holds (None:
        unlimited, 0: no memory tier).
    disk_budget_bytes / remote_budget_bytes: byte budgets of the local blob store and the
        remote one (None: unlimited); enforced after every write and by ``ragkv cache gc``.
    remote_blob_url: optional fsspec URL of a remote blob tier below the local disk.
    remote_blob_options: fsspec storage options for ``remote_blob_url``.
    eviction_policy: ``pgdsf`` (frequency x recompute cost / size, with aging) or ``lru``.
    device / dtype: where and in which precision the model runs.
    kernels: hot-path implementation: ``auto`` (Triton on CUDA when installed, else the
        PyTorch reference), ``torch`` or ``triton``.
    engine: which engine answers: ``hf`` (transformers, in process), ``vllm`` (a vLLM engine
        in process with ragkv's KV connector; the ``vllm`` extra) or the URL of a vLLM server
        started with the connector (``http://host:8000/v1``; see ``ragkv serve``). Every
        front end works the same on all three.
    """

    home: Path = field(default_factory=default_home)
    model: Path | None = None
    index_url: str | None = None
    blob_url: str | None = None
    blob_options: dict[str, Any] = field(default_factory=dict)
    chunk_tokens: int = 512
    precompute_context: PrecomputeContext = "anchor"
    anchor_text: str | None = None
    anchor_source: Literal["corpus", "builtin"] = "corpus"
    kv_dtype: Literal["float32", "float16", "bfloat16", "int8"] = "float16"
    int8_key_scales: Literal["channel", "token"] = "channel"
    int8_value_scales: Literal["channel", "token"] = "token"
    memory_budget_bytes: int | None = 512 * 2**20
    disk_budget_bytes: int | None = None
    remote_blob_url: str | None = None
    remote_blob_options: dict[str, Any] = field(default_factory=dict)
    remote_budget_bytes: int | None = None
    eviction_policy: Literal["pgdsf", "lru"] = "pgdsf"
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    kernels: Literal["auto", "torch", "triton"] = "auto"
    engine: str = "hf"
    system_prompt: str = "You are a helpful assistant. Answer the question using the context."
    blend: BlendConfig = field(default_factory=BlendConfig)

    def __post_init__(self) -> None:
        for name in ("home", "model"):
            value = getattr(self, name)
            if value is None and name == "model":
                continue
            if not isinstance(value, str | os.PathLike) or not str(value).strip():
                raise ValueError(f"{name} must be a folder path, got {value!r}")
            setattr(self, name, Path(value).expanduser())
        for name in ("index_url", "blob_url", "remote_blob_url", "anchor_text"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        for name in ("blob_options", "remote_blob_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict of storage options, got "
                                 f"{getattr(self, name)!r}")
        as_python(self, (), ("chunk_tokens", "memory_budget_bytes", "disk_budget_bytes",
                              "remote_budget_bytes"))
        if self.home.exists() and not self.home.is_dir():
            raise ValueError(f"home {self.home} is a file; give a folder (created if missing)")
        if isinstance(self.blend, dict):  # the knobs as a mapping, e.g. from a settings file
            try:
                self.blend = BlendConfig(**self.blend)
            except TypeError as exc:  # a name BlendConfig does not have
                raise ValueError(f"blend: {exc}") from None
        if not isinstance(self.blend, BlendConfig):
            raise ValueError(f"blend must be a BlendConfig, got {type(self.blend).__name__}")
        for name in ("engine", "system_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not (is_whole(self.chunk_tokens) and self.chunk_tokens >= 16):
            raise ValueError(f"chunk_tokens must be a whole number >= 16, got "
                             f"{self.chunk_tokens!r}")
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or another "
                             f"torch device, got {self.device!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        for name in ("int8_key_scales", "int8_value_scales"):
            if getattr(self, name) not in ("channel", "token"):
                raise ValueError(f"{name} must be 'channel' or 'token', got "
                                 f"{getattr(self, name)!r}")
        if self.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', got {self.kernels!r}")
        if self.engine not in ENGINES and not self.engine.startswith(("http://", "https://")):
            raise ValueError(f"engine must be 'hf', 'vllm' or the http(s):// URL of a vLLM "
                             f"server with ragkv's connector, got {self.engine!r}")
        if self.precompute_context not in PRECOMPUTE_CONTEXTS:
            raise ValueError(f"precompute_context must be 'cold', 'prefix' or 'anchor', "
                             f"got {self.precompute_context!r}")
        if self.anchor_text is not None and not self.anchor_text.strip():
            raise ValueError("anchor_text is empty; give a passage or None for the default")
        if self.anchor_source not in ("corpus", "builtin"):
            raise ValueError(f"anchor_source must be 'corpus' or 'builtin', "
                             f"got {self.anchor_source!r}")
        if self.kv_dtype not in ("float32", "float16", "bfloat16", "int8"):
            raise ValueError(f"kv_dtype must be float32, float16, bfloat16 or int8, "
                             f"got {self.kv_dtype!r}")
        if self.eviction_policy not in ("pgdsf", "lru"):
            raise ValueError(f"eviction_policy must be 'pgdsf' or 'lru', "
                             f"got {self.eviction_policy!r}")
        for name in ("memory_budget_bytes", "disk_budget_bytes", "remote_budget_bytes"):
            budget = getattr(self, name)
            if budget is not None and not (is_whole(budget) and budget >= 0):
                raise ValueError(f"{name} must be a whole number of bytes >= 0 or None, got "
                                 f"{budget!r}")

    @property
    def int8_codec(self):  # -> Int8Codec | None; untyped to keep torch out of config imports
        """The codec of ``kv_dtype="int8"`` (None for float storage)."""
        if self.kv_dtype != "int8":
            return None
        from ragkv.cache_index.codec import Int8Codec

        return Int8Codec(self.int8_key_scales, self.int8_value_scales)

    @property
    def resolved_anchor_text(self) -> str:
        from ragkv.anchor import ANCHOR_TEXT

        return ANCHOR_TEXT if self.anchor_text is None else self.anchor_text

    @property
    def kv_storage(self) -> str:
        """What cache keys record as the storage dtype: int8 scale layouts are distinct."""
        codec = self.int8_codec
        return codec.tag if codec is not None else self.kv_dtype

    @property
    def resolved_index_url(self) -> str:
        # quoted: a home with '?', '#' or '%' in its path is a path, not URL syntax
        return self.index_url or f"sqlite:///{quote(str(self.home / INDEX_FILE), safe='/')}"

    @property
    def resolved_blob_url(self) -> str:
        return self.blob_url or str(self.home / "blobs")
