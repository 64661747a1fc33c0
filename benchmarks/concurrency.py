"""Many clients at once through a served vLLM with ragkv against plain vLLM with its prefix
cache: throughput and p50/p99 TTFT for 1, 2, 4 and 8 clients, errors, and whether any client
got another's answer (each first token checked against a quiet single-client run).

    python benchmarks/concurrency.py [--clients 1,2,4,8] [--per-client 4]

Each arm is its own server on the machine alone; queries are the first public pydoc cases
(their chunks in shuffled order). Writes ``benchmarks/results/concurrency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from bench_args import out_file

from ragkv.bench_report import percentile
from ragkv.config import BlendConfig, RagkvConfig

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "benchmarks" / "cases" / "pydoc.jsonl"


def start(cmd: list[str], url: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc
        except OSError:
            time.sleep(2)
    raise SystemExit("server not healthy")


def variant(case: dict, seed: int) -> dict:
    chunks = list(case["chunks"])
    random.Random(seed).shuffle(chunks)
    return {**case, "chunks": chunks}


def run_arm(arm: str, home: Path, queries: list[dict], clients: list[int], per: int,
            port: int) -> dict:
    from ragkv.api import RagKV
    from ragkv.engine.vllm.engine import serve_command
    from ragkv.model_fetch import ensure_default_model

    cfg = RagkvConfig(home=home, kv_dtype="float32")
    model = ensure_default_model(RagkvConfig().home)
    cmd = serve_command(cfg, model, port=port, kv_cache_bytes=2 << 30,
                        connector=arm == "ragkv")
    url = f"http://127.0.0.1:{port}"
    proc = start(cmd, url, home.parent / f"{arm}.log")
    try:
        if arm == "ragkv":
            rag = RagKV(RagkvConfig(home=home, engine=url + "/v1"))
            mode, blend = "blend", BlendConfig()  # the default blend
        else:  # plain vLLM: an app that sends the same token ids, prefix cache on
            from transformers import AutoTokenizer

            from ragkv.engine.vllm.backend import VLLMBackend
            from ragkv.engine.vllm.transport import HTTP
            from ragkv.keys import KeySpace
            from ragkv.prompt import PromptTemplate

            tok = AutoTokenizer.from_pretrained(model)
            tpl = PromptTemplate.from_tokenizer(tok, cfg.system_prompt)
            http = HTTP(url)
            # no connector, nothing precomputed: its keys only name the prompt's parts
            plain = replace(cfg, precompute_context="prefix")
            backend = VLLMBackend(http, tok, KeySpace("plain", "float32", tpl.prefix_ids), tpl,
                                  int(http.max_model_len or 8192), f"plain vLLM at {url}")
            rag = RagKV(plain, backend=backend)
            mode, blend = "prefix", None
        chunk_ids = {c: rag.tokenizer(c, add_special_tokens=False).input_ids
                     for q in queries for c in q["chunks"]}
        if arm == "ragkv":
            rag.precompute_many(list(chunk_ids.values()))
        else:  # the corpus seen once, each chunk after the prefix: what ragkv's arm prefills
            from ragkv.engine.vllm.client import VLLMRequest

            http.complete([VLLMRequest(list(tpl.prefix_ids) + ids, None, None)
                           for ids in chunk_ids.values()], 1)

        def ask(q: dict) -> tuple[float, list[int], str | None]:
            try:
                a = rag.generate([chunk_ids[c] for c in q["chunks"]], q["question"],
                                 mode=mode, blend=blend, max_new_tokens=8, log_query=False)
                return a.trace.ttft_s, a.tokens, None
            except Exception as exc:  # noqa: BLE001 - counted, not raised
                return float("nan"), [], str(exc)

        # one untimed request first: a fresh server's first prompt builds its kernels' state
        # (21 s once on the CPU build, against 2.5 s for the next) and would otherwise land in
        # the 1-client round
        ask(variant(queries[0], 10**6))
        out = {}
        asked: list[tuple[dict, list[int]]] = []
        for n in clients:
            # every request a prompt not seen before (its own chunk order), so neither arm's
            # prefix cache holds the whole prompt; the answer is checked afterwards
            work = [variant(queries[i % len(queries)], n * 1000 + i) for i in range(n * per)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                res = list(pool.map(lambda q: (q, *ask(q)), work))
            wall = time.perf_counter() - t0
            asked += [(r[0], r[2]) for r in res if r[3] is None]
            ttft = [r[1] for r in res if r[3] is None]
            failed = [r[3] for r in res if r[3] is not None]
            if failed:
                print(f"{arm}: {len(failed)} of {len(res)} requests failed; the first: "
                      f"{failed[0]}", file=sys.stderr, flush=True)
            if not ttft:
                raise SystemExit(f"{arm}: every request at {n} clients failed")
            out[str(n)] = {
                "queries": len(res), "errors": len(failed),
                "throughput_qps": len(res) / wall, "ttft_p50_s": percentile(ttft, 50),
                "ttft_p99_s": percentile(ttft, 99), "ttft_mean_s": statistics.fmean(ttft),
                "ttft_s": ttft}
            print(arm, n, out[str(n)], file=sys.stderr, flush=True)
        # the same prompts again, one at a time: an answer that differs was another's
        out["differs_from_quiet_run"] = sum(ask(q)[1] != tokens for q, tokens in asked)
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--per-client", type=int, default=2,
                    help="requests each client sends (2: the published runs)")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--out", type=out_file, default=ROOT / "benchmarks/results/concurrency.json")
    a = ap.parse_args()
    rng = random.Random(0)
    cases = [json.loads(line) for line in CASES.read_text().splitlines()[:a.cases]]
    for c in cases:
        rng.shuffle(c["chunks"])
    clients = [int(n) for n in a.clients.split(",")]
    default = BlendConfig()
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "clients": clients,
              "per_client": a.per_client, "cases": len(cases), "ratio": default.ratio,
              "check_layers": list(default.check_layers)}
    with tempfile.TemporaryDirectory(prefix="ragkv-conc-") as tmp:
        for i, arm in enumerate(("plain", "ragkv")):
            home = Path(tmp) / arm / "home"
            home.mkdir(parents=True)
            result[arm] = run_arm(arm, home, cases, clients, a.per_client, 18100 + i)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"{'clients':>7} | {'plain q/s':>9} {'p50':>6} {'p99':>6} | {'ragkv q/s':>9} "
          f"{'p50':>6} {'p99':>6} | errors")
    for n in clients:
        p, r = result["plain"][str(n)], result["ragkv"][str(n)]
        print(f"{n:>7} | {p['throughput_qps']:9.2f} {p['ttft_p50_s']:6.2f} "
              f"{p['ttft_p99_s']:6.2f} | {r['throughput_qps']:9.2f} {r['ttft_p50_s']:6.2f} "
              f"{r['ttft_p99_s']:6.2f} | {p['errors'] + r['errors']}")
    print(f"answers that differ from a quiet run of the same prompt: plain "
          f"{result['plain']['differs_from_quiet_run']}, ragkv "
          f"{result['ragkv']['differs_from_quiet_run']}")


if __name__ == "__main__":
    main()
