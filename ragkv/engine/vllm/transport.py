"""How requests reach vLLM: an ``LLM`` in this process, or a server over HTTP.

Both carry the same :class:`~ragkv.engine.vllm.client.VLLMRequest` (token ids, the
connector's ``kv_transfer_params``, the cache salt) and hand back the same
:class:`Completion`, so :class:`~ragkv.engine.vllm.backend.VLLMBackend` is written once.
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ragkv.engine.base import EngineError
from ragkv.engine.vllm.client import VLLMRequest
from ragkv.engine.vllm.params import PARAMS_KEY

log = logging.getLogger("ragkv.vllm")

#: concurrent HTTP requests for a batch (vLLM batches what arrives together)
HTTP_PARALLEL = 8


@dataclass
class Completion:
    """One finished request: its tokens, the first token's top log-probabilities, the
    connector's note (``kv_transfer_params['ragkv']``) and vLLM's own TTFT figure."""

    tokens: list[int]
    first_top: dict[int, float] = field(default_factory=dict)
    note: dict[str, Any] = field(default_factory=dict)
    engine_ttft_s: float | None = None
    cached_tokens: int = 0  # prompt tokens vLLM's own prefix cache served


def _note(transfer: Any) -> dict[str, Any]:
    note = (transfer or {}).get(PARAMS_KEY) if isinstance(transfer, dict) else None
    return note if isinstance(note, dict) else {}


class InProcess:
    """A vLLM ``LLM`` held by this process."""

    def __init__(self, llm: Any, model: str) -> None:
        self.llm, self.model = llm, model
        # A program that never closes the facade must still exit: at interpreter exit,
        # multiprocessing waits on every child, the engine core included, and that one
        # stops only when told to. Handlers run last-registered first, so this one runs
        # before that wait.
        atexit.register(self.close)

    def _params(self, req: VLLMRequest, max_tokens: int, logprobs: int | None,
                prompt_logprobs: int | None = None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=req.ids)
        if req.cache_salt:
            prompt["cache_salt"] = req.cache_salt
        extra = {"kv_transfer_params": req.kv_transfer_params} if req.kv_transfer_params else None
        return prompt, SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs,
                                      prompt_logprobs=prompt_logprobs, extra_args=extra)

    def complete(self, reqs: Sequence[VLLMRequest], max_tokens: int,
                 logprobs: int | None = None) -> list[Completion]:
        pairs = [self._params(r, max_tokens, logprobs) for r in reqs]
        outs = self.llm.generate([p for p, _ in pairs], [s for _, s in pairs], use_tqdm=False)
        done = []
        for out in outs:
            comp = out.outputs[0]
            lp = comp.logprobs or []
            top = {int(t): float(v.logprob) for t, v in lp[0].items()} if lp else {}
            m = getattr(out, "metrics", None)
            ttft = (m.first_token_ts - m.scheduled_ts
                    if m is not None and m.first_token_ts > 0 and m.scheduled_ts > 0 else None)
            done.append(Completion(list(comp.token_ids), top, _note(out.kv_transfer_params),
                                   ttft, int(getattr(out, "num_cached_tokens", 0) or 0)))
        return done

    def stream(self, req: VLLMRequest, max_tokens: int) -> Iterator[int]:
        yield from self.complete([req], max_tokens)[0].tokens

    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict[int, float] | None]:
        prompt, sp = self._params(VLLMRequest(ids, None, None), 1, None, prompt_logprobs=k)
        out = self.llm.generate([prompt], sp, use_tqdm=False)[0]
        return [None if row is None else {int(t): float(v.logprob) for t, v in row.items()}
                for row in (out.prompt_logprobs or [])]

    def close(self) -> None:
        """Stop the engine's processes now: left to interpreter exit, vLLM's engine core
        outlived its parent (the exit waited on it for good)."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception as exc:  # noqa: BLE001 - closing must not fail the caller
                log.warning("vLLM engine did not shut down cleanly: %s", exc)


class HTTP:
    """A vLLM OpenAI-compatible server (``/v1/completions``) started with the connector."""

    def __init__(self, url: str, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.timeout_s = timeout_s
        with self._reading("its model list"):
            models = self._get("/models").get("data") or []
            if not models:
                raise EngineError(f"the server at {self.url} serves no model")
            self.model: str = str(models[0]["id"])
            window = models[0].get("max_model_len")
            self.max_model_len: int | None = None if window is None else int(window)

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """An answer of another shape than vLLM's (another server, a proxy's error page with
        HTTP 200) is one line, not a KeyError from inside."""
        try:
            yield
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise EngineError(f"the server at {self.url} answered {what} in a form ragkv does "
                              f"not read ({type(exc).__name__}: {exc}); is it a vLLM server "
                              f"started by `ragkv serve`?") from None

    # ---- plumbing ------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> EngineError:
        return EngineError(f"the vLLM server at {self.url} did not answer ({exc}); is it "
                           "running? (`ragkv serve` starts one)")

    def _get(self, path: str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as resp:
                return json.load(resp)
        except (urllib.error.URLError, OSError, http.client.HTTPException,
                json.JSONDecodeError) as exc:
            raise self._fail(exc) from None

    def _open(self, body: dict[str, Any]):
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/completions", data,
                                     {"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise EngineError(f"the vLLM server at {self.url} refused the request "
                              f"(HTTP {exc.code}): {detail}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._fail(exc) from None

    def _body(self, req: VLLMRequest, max_tokens: int, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": req.ids, "max_tokens": max_tokens,
                                "temperature": 0, "return_token_ids": True,
                                "return_tokens_as_token_ids": True, **extra}
        if req.kv_transfer_params:
            body["kv_transfer_params"] = req.kv_transfer_params
        if req.cache_salt:
            body["cache_salt"] = req.cache_salt
        return body

    @staticmethod
    def _top(row: dict[str, float] | None) -> dict[int, float]:
        # "token_id:123" keys (return_tokens_as_token_ids): ids survive any detokenizer
        return {int(t.rpartition(":")[2]): float(v) for t, v in (row or {}).items()}

    # ---- transport -----------------------------------------------------------------------
    def _one(self, req: VLLMRequest, max_tokens: int, logprobs: int | None) -> Completion:
        extra = {"logprobs": logprobs} if logprobs else {}
        try:
            with self._open(self._body(req, max_tokens, **extra)) as resp:
                out = json.load(resp)
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            raise self._fail(exc) from None
        with self._reading("a completion"):
            choice = out["choices"][0]
            tops = ((choice.get("logprobs") or {}).get("top_logprobs")) or []
            metrics = out.get("metrics") or {}
            ttft_ms = metrics.get("time_to_first_token_ms")
            details = (out.get("usage") or {}).get("prompt_tokens_details") or {}
            return Completion([int(t) for t in choice.get("token_ids") or []],
                              self._top(tops[0] if tops else None),
                              _note(out.get("kv_transfer_params")),
                              None if ttft_ms is None else ttft_ms / 1e3,
                              int(details.get("cached_tokens") or 0))

    def complete(self, reqs: Sequence[VLLMRequest], max_tokens: int,
                 logprobs: int | None = None) -> list[Completion]:
        if len(reqs) == 1:
            return [self._one(reqs[0], max_tokens, logprobs)]
        with ThreadPoolExecutor(min(HTTP_PARALLEL, len(reqs))) as pool:
            return list(pool.map(lambda r: self._one(r, max_tokens, logprobs), reqs))

    def stream(self, req: VLLMRequest, max_tokens: int) -> Iterator[int]:
        """Token ids as the server streams them (server-sent events)."""
        resp = self._open(self._body(req, max_tokens, stream=True))
        try:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                with self._reading("a streamed answer"):
                    if "error" in chunk:
                        raise EngineError(f"the vLLM server at {self.url} failed mid-answer: "
                                          f"{chunk['error']}")
                    ids = [int(t) for choice in chunk.get("choices") or []
                           for t in choice.get("token_ids") or []]
                yield from ids
        except (TimeoutError, OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            raise self._fail(exc) from None
        finally:
            resp.close()
        raise EngineError(f"the vLLM server at {self.url} closed the stream mid-answer")

    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict[int, float] | None]:
        body = self._body(VLLMRequest(ids, None, None), 1, prompt_logprobs=k)
        try:
            with self._open(body) as resp:
                out = json.load(resp)
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            raise self._fail(exc) from None
        with self._reading("prompt log-probabilities"):
            rows = out["choices"][0].get("prompt_logprobs") or []
            return [None if r is None else {int(t): float(v["logprob"]) for t, v in r.items()}
                    for r in rows]

    def close(self) -> None:
        pass
