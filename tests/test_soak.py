"""The soak script (benchmarks/soak.py) in miniature: two clients for 18 seconds over one case of
each case file, ingestion meanwhile, a disk budget below the working set (slow: the real
SmolLM2 in four processes; `make test-slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_soak_passes(tmp_path: Path, smol_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.3",
         "--clients", "2", "--cases", "1", "--home", str(tmp_path / "home"), "--out", str(out)],
        capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASSED" in proc.stdout
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["passed"] and s["clients"] == 2
    assert s["queries"] >= 1 and s["failed_queries"] == 0
    assert s["answers_compared"] >= 1 and s["answers_differing"] == 0
    assert s["verify_bad"] == 0 and s["verify_orphans"] == 0
    assert result["setup"]["disk_budget_bytes"] < result["setup"]["working_set_bytes"]
    assert s["ingest_documents"] >= 1 and s["ingest_failed"] == 0
    for rec in result["records"]:
        assert len(rec["keys"]) == len(rec["order"]) >= 4
        assert len(rec["tokens"]) >= 1 and rec["error"] is None
