"""The same benchmark on every engine of the contract: transformers in process, vLLM in
process, and a vLLM server started by ``ragkv serve`` (each alone on the machine).

    python benchmarks/engines.py [--limit 8] [--engines hf,vllm,served]

For each engine: ``ragkv bench`` on the first cases of the public pydoc set, full prefill and
blend at the default ratio and check layer, the TTFT measured where the request is made (the
client, for the server) and vLLM's own figure (scheduling to first token) beside it. Writes
``benchmarks/results/engines_pydoc.json``; medians per engine are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_args import count, out_file

from ragkv.config import DEFAULT_RATIO

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "benchmarks" / "cases" / "pydoc.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> str:
    from ragkv.config import default_home
    from ragkv.model_fetch import ensure_default_model

    return str(ensure_default_model(default_home()))


def start_server(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ragkv.cli", "serve", "--home", str(home), "--port", str(port),
           "--kv-cache-mb", "2048", "--model", default_model()]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ,
                                                             "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url + "/v1"
        except OSError:
            time.sleep(2)
    raise SystemExit("server not healthy")


def bench(engine: str, home: Path, out: Path, limit: int) -> dict:
    cmd = [sys.executable, "-m", "ragkv.cli", "bench", "--cases", str(CASES), "--limit",
           str(limit), "--modes", "full,blend", "--ratios", str(DEFAULT_RATIO),
           "--kv-dtype", "float32",
           "--max-new-tokens", "16", "--engine", engine, "--home", str(home), "--out", str(out),
           "--model", default_model()]
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=count, default=8)
    ap.add_argument("--engines", default="hf,vllm,served")
    ap.add_argument("--out", type=out_file, default=ROOT / "benchmarks/results/engines_pydoc.json")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ragkv-engines-") as tmp:
        for name in a.engines.split(","):
            home = Path(tmp) / name
            part = Path(tmp) / f"{name}.json"
            if name == "served":
                proc, url = start_server(home, Path(tmp) / "server.log")
                try:
                    results[name] = bench(url, home, part, a.limit)
                finally:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
            else:
                results[name] = bench(name, home, part, a.limit)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    for name, r in results.items():
        for s in r["summary"]:
            if s["mode"] != "blend":
                continue
            full = [c["full_ttft_s"] for c in r["cases"] if c["mode"] == "full"]
            print(f"{name:7s} blend {s['ratio']}: TTFT {s['ttft_median_s']:.3f} s "
                  f"(engine {s['engine_ttft_median_s'] or float('nan'):.3f} s), full "
                  f"{statistics.median(full):.3f} s, x{s['speedup_median']:.2f}, "
                  f"1st agree {s['first_token_agree']:.3f}, KL {s['first_token_kl_median']:.4f}"
                  f" ({s['kl_basis']})")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
