"""What a request tells the connector: per-request parameters, their checks, and the salt.

A client sends them as ``kv_transfer_params = {"ragkv": {...}}`` (offline: in
``SamplingParams.extra_args``; OpenAI server: the request body's ``kv_transfer_params``)::

    {"ragkv": {"mode": "blend",                       # or "reuse"
               "prefix_end": 31,                      # template prefix is [0, prefix_end)
               "chunks": [[31, 420, "<key>"], ...],   # [start, end, cache key] in prompt order
               "suffix_start": 900,                   # the question suffix: computed by vLLM
               "context": "prefix",                   # how chunks were precomputed
               "anchor": [...],                       # context "anchor": the passage's ids
               "blend": {"ratio": 0.12, "policy": "qhkvd", "check_layers": [2],
                         "deviation_on": "k"}}}

A precompute request instead names ``"save": [[start, end, "<key>"]]``: vLLM prefills the
prompt as usual and the connector stores those positions' KV under the key. Two questions a
client may ask (a one-token request; the answer comes back in the output's
``kv_transfer_params``): ``{"describe": true}`` (the connector's model identity, storage and
cache, so a client derives the same keys) and ``{"contains": ["<key>", ...]}`` (which keys
the cache holds). ``"record": true`` on a fused request adds the positions computed at each
layer to its trace; ``"again": true`` marks one that fuses a prompt fused before (the rest of
an answer): its chunks are read without counting a use.

Fused (``reuse``/``blend``) KV is not what full prefill gives, so a fused request must carry
``cache_salt = fusion_salt(...)``: vLLM's prefix cache then keeps its blocks apart from exact
ones (and identical fused requests still share theirs). Plain Python: no vLLM import.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ragkv.config import DEFAULT_CHECK_LAYERS, BlendConfig
from ragkv.engine.policies import reads_question

PARAMS_KEY = "ragkv"
FUSED_MODES = ("reuse", "blend")


#: keys one ``contains`` question may name (a bound on what any HTTP client can ask for)
MAX_CONTAINS = 4096
#: tokens an anchor passage may have (it precedes every chunk a miss recomputes)
MAX_ANCHOR = 8192
CONTEXTS = ("prefix", "cold", "anchor")


class ParamsError(ValueError):
    """Malformed ragkv connector parameters (the request falls back to full prefill)."""


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    key: str


@dataclass(frozen=True)
class FusionParams:
    mode: str = "blend"
    prefix_end: int = 0
    chunks: tuple[Span, ...] = ()
    suffix_start: int = 0
    context: str = "prefix"
    blend: BlendConfig = field(default_factory=BlendConfig)
    save: tuple[Span, ...] = ()
    record: bool = False
    describe: bool = False
    #: a prompt fused again for the rest of its answer: its reads are not uses of the chunks
    again: bool = False
    contains: tuple[str, ...] = ()
    anchor: tuple[int, ...] = ()
    #: a save's spans are stored with their context score against the same tokens' entry
    #: after ``ids[:reference_end]`` (0: none; an anchor-context save names the prefix's end)
    reference_end: int = 0

    @property
    def fused(self) -> bool:
        return bool(self.chunks)

    def to_json(self) -> dict[str, Any]:
        """The ``kv_transfer_params`` value a client sends."""
        body: dict[str, Any] = {"context": self.context}
        if self.anchor:
            body["anchor"] = list(self.anchor)
        if self.describe:
            body["describe"] = True
        if self.contains:
            body["contains"] = list(self.contains)
        if self.record:
            body["record"] = True
        if self.again:
            body["again"] = True
        if self.chunks:
            b = asdict(self.blend)
            b["check_layers"] = list(b["check_layers"])
            body.update(mode=self.mode, prefix_end=self.prefix_end, suffix_start=self.suffix_start,
                        chunks=[[s.start, s.end, s.key] for s in self.chunks], blend=b)
        if self.save:
            body["save"] = [[s.start, s.end, s.key] for s in self.save]
            if self.reference_end:
                body["reference_end"] = self.reference_end
        return {PARAMS_KEY: body}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _spans(raw: Any, name: str, n: int) -> tuple[Span, ...]:
    if not isinstance(raw, list):
        raise ParamsError(f"'{name}' must be a list of [start, end, key]")
    out = []
    for i, item in enumerate(raw):
        if (not isinstance(item, list | tuple) or len(item) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item[:2])
                or not isinstance(item[2], str) or len(item[2]) != 64):
            raise ParamsError(f"{name}[{i}] must be [start, end, 64-hex key], got {item!r}")
        s, e, key = item
        if not 0 <= s < e <= n:
            raise ParamsError(f"{name}[{i}] span [{s}, {e}) is empty or outside the prompt "
                              f"of {n} tokens")
        if out and s < out[-1].end:
            raise ParamsError(f"{name}[{i}] overlaps or precedes the span before it")
        out.append(Span(s, e, key))
    return tuple(out)


def parse(transfer: Any, n_prompt: int) -> FusionParams | None:
    """The request's ragkv parameters, None when it has none; raises ParamsError."""
    if not isinstance(transfer, dict) or PARAMS_KEY not in transfer:
        return None
    body = transfer[PARAMS_KEY]
    if not isinstance(body, dict):
        raise ParamsError("kv_transfer_params['ragkv'] must be an object")
    context = body.get("context", "prefix")
    if context not in CONTEXTS:
        raise ParamsError(f"context must be 'prefix', 'cold' or 'anchor', got {context!r}")
    if body.get("describe") is True:
        return FusionParams(context=context, describe=True)
    if "contains" in body:
        keys = body["contains"]
        if (not isinstance(keys, list) or len(keys) > MAX_CONTAINS
                or not all(isinstance(k, str) and len(k) == 64 for k in keys)):
            raise ParamsError(f"'contains' must be a list of at most {MAX_CONTAINS} keys")
        return FusionParams(context=context, contains=tuple(keys))
    save = _spans(body.get("save", []), "save", n_prompt)
    ref = body.get("reference_end", 0)
    if not _is_int(ref) or not 0 <= ref <= (save[0].start if save else 0):
        raise ParamsError("'reference_end' must be an integer within the tokens before the "
                          "first saved span")
    if "chunks" not in body:
        if not save:
            raise ParamsError("ragkv parameters name neither 'chunks' nor 'save'")
        return FusionParams(context=context, save=save, reference_end=ref)
    if save:  # a save would store the fused KV, not a prefill's, under an exact span's key
        raise ParamsError("a request names 'chunks' to fuse or spans to 'save', not both")
    anchor = body.get("anchor", [])
    if (not isinstance(anchor, list) or len(anchor) > MAX_ANCHOR
            or not all(_is_int(t) and t >= 0 for t in anchor)):
        raise ParamsError(f"'anchor' must be a list of at most {MAX_ANCHOR} token ids")
    if context == "anchor" and not anchor:
        raise ParamsError("context 'anchor' needs the anchor passage's token ids ('anchor')")
    mode = body.get("mode", "blend")
    if mode not in FUSED_MODES:
        raise ParamsError(f"mode must be one of {', '.join(FUSED_MODES)}, got {mode!r}")
    chunks = _spans(body["chunks"], "chunks", n_prompt)
    prefix_end, suffix_start = body.get("prefix_end"), body.get("suffix_start")
    if not (_is_int(prefix_end) and _is_int(suffix_start)):
        raise ParamsError("prefix_end and suffix_start must be integers")
    if not chunks or not 0 < prefix_end <= chunks[0].start:
        raise ParamsError("need at least one chunk, after a non-empty template prefix")
    if not chunks[-1].end <= suffix_start < n_prompt:
        raise ParamsError(f"suffix_start {suffix_start} must lie after the last chunk and "
                          f"before the prompt's end ({n_prompt})")
    raw = body.get("blend", {})
    if not isinstance(raw, dict):
        raise ParamsError("'blend' must be an object")
    # Any HTTP client sends these: types are checked before the settings reach the worker.
    layers = raw.get("check_layers", DEFAULT_CHECK_LAYERS)
    if (not isinstance(raw.get("policy", ""), str)
            or not isinstance(layers, list | tuple) or not all(_is_int(x) for x in layers)
            or not _is_int(raw.get("head_tokens", 0)) or raw.get("head_tokens", 0) < 0
            or isinstance(raw.get("ratio"), bool)
            or not isinstance(raw.get("ratio", 0.0), int | float | str)
            or not isinstance(raw.get("min_ratio", 0.0), int | float)
            or isinstance(raw.get("min_ratio"), bool)
            or not isinstance(raw.get("correction", ""), str)):
        raise ParamsError("bad blend settings: policy must be a name, check_layers integers, "
                          "head_tokens a non-negative integer, ratio a number")
    try:
        blend = BlendConfig(**{**raw, "check_layers": tuple(layers)})
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"bad blend settings: {exc}") from None
    if blend.ratio == "auto":
        raise ParamsError("ratio must be a number in a request ('auto' is resolved by ragkv's "
                          "client before it sends one)")
    record, again = body.get("record", False), body.get("again", False)
    if not isinstance(record, bool) or not isinstance(again, bool):
        raise ParamsError("'record' and 'again' must be true or false")
    return FusionParams(mode, prefix_end, chunks, suffix_start, context, blend, save, record,
                        anchor=tuple(anchor), reference_end=ref, again=again)


def fusion_salt(params: FusionParams, prompt_ids: list[int]) -> str:
    """The ``cache_salt`` a fused request must carry: a digest of everything, besides the
    tokens themselves, that decides the fused KV of its context."""
    b = params.blend
    payload: dict[str, Any] = {
        "mode": params.mode, "context": params.context, "prefix_end": params.prefix_end,
        "chunks": [[s.start, s.end, s.key] for s in params.chunks],
        "suffix_start": params.suffix_start,
    }
    if params.mode == "blend":
        payload["blend"] = [b.ratio, b.policy, list(b.check_layers), b.deviation_on,
                            b.head_tokens, b.correction, b.correction_strength, b.coverage,
                            b.max_ratio, b.floor_ratio, b.start_factor, b.correction_window,
                            b.correction_mix, b.preselect, b.preselect_from, b.preselect_by]
        if reads_question(b):
            payload["question"] = [int(t) for t in prompt_ids[params.suffix_start:]]
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return "ragkv-fusion:" + hashlib.sha256(blob).hexdigest()


_FINGERPRINTS: dict[tuple, str] = {}


#: The files that make a model's tokenizer (as Hugging Face saves it), in the order digested.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "special_tokens_map.json")


def tokenizer_digest(model_dir: str) -> str | None:
    """SHA-256 of a model folder's tokenizer files: a client tokenizing for a server must
    hold the same ones (None: the folder has none, e.g. a hub name)."""
    from pathlib import Path

    h, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        f = Path(model_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
            found = True
    return h.hexdigest() if found else None


def vllm_fingerprint(model_dir: str, dtype: str) -> str:
    """Model identity for KV computed by vLLM: ``vllm:`` + SHA-256 of the folder's
    ``config.json`` and weight files (bytes, in name order) and the compute dtype.

    A namespace of its own: ragkv's transformers backend fingerprints its loaded
    ``state_dict``, whose names and layout differ from vLLM's merged projections, and the two
    engines' kernels round differently, so neither reads the other's entries.
    """
    from pathlib import Path

    root = Path(model_dir)
    files = [root / "config.json", *sorted(root.glob("*.safetensors")), *sorted(root.glob("*.bin"))]
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(f"{model_dir}: no config.json or weight files to fingerprint")
    stamp = (str(root.resolve()), dtype, tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                              for f in files))
    if stamp not in _FINGERPRINTS:
        h = hashlib.sha256(f"ragkv-vllm/1;dtype={dtype}".encode())
        for f in files:
            h.update(f.name.encode())
            with f.open("rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
        # 64 characters in all, as every fingerprint: the index column is that wide
        _FINGERPRINTS[stamp] = "vllm:" + h.hexdigest()[:59]
    return _FINGERPRINTS[stamp]
