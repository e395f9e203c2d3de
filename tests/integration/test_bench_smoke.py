"""bench/issue.py keeps running, keeps measuring the real pipeline and keeps its output format.

The figures themselves are machine-dependent and not checked; what is checked is that the
script exits 0, prints the lines docs/performance.md documents, and that the SQLite file
it leaves behind really holds every certificate it claims to have issued, with audit
events, in WAL mode. A bench that quietly stopped storing would still print numbers —
faster ones.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench" / "issue.py"
COUNT, BASELINE_COUNT, WARMUP = 200, 200, 10
SMALL_RUN = [
    "--count",
    str(COUNT),
    "--baseline-count",
    str(BASELINE_COUNT),
    "--warmup",
    str(WARMUP),
]

NUMBER = r"(\d+(?:\.\d+)?)"
PIPELINE_LINE = re.compile(
    r"^pipeline: (\d+) certs/s \(wall\), (\d+) certs/CPU-s  "
    r"\[N=(\d+), SQLite WAL, P-256, CSR -> stored \+ audited\]$",
    re.MULTILINE,
)
BASELINE_LINE = re.compile(
    r"^baseline: (\d+) certs/s raw cryptography signing \(wall\), (\d+) certs/CPU-s  "
    r"\[N=(\d+), P-256, no DB\]$",
    re.MULTILINE,
)
RATIO_LINE = re.compile(rf"^ratio pipeline/baseline: {NUMBER}$", re.MULTILINE)


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def stored_counts(db_file: Path) -> tuple[str, int, int]:
    """(journal mode, device certificates, certificate.issued audit events) in the bench DB."""
    conn = sqlite3.connect(db_file)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        certs = conn.execute(
            "SELECT count(*) FROM certificates WHERE profile = 'device'"
        ).fetchone()[0]
        events = conn.execute(
            "SELECT count(*) FROM audit_events WHERE action = 'certificate.issued'"
        ).fetchone()[0]
    finally:
        conn.close()
    return mode, certs, events


def test_text_output_has_documented_lines_and_every_certificate_is_stored(tmp_path: Path) -> None:
    data_dir = tmp_path / "bench"
    result = run_bench(*SMALL_RUN, "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout

    pipeline = PIPELINE_LINE.search(out)
    baseline = BASELINE_LINE.search(out)
    ratio = RATIO_LINE.search(out)
    assert pipeline and baseline and ratio, f"output format drifted:\n{out}"
    pipe_wall, pipe_cpu, pipe_n = (int(g) for g in pipeline.groups())
    base_wall, base_cpu, base_n = (int(g) for g in baseline.groups())
    assert (pipe_n, base_n) == (COUNT, BASELINE_COUNT)
    assert min(pipe_wall, pipe_cpu, base_wall, base_cpu) > 0
    # The ratio is the two printed rates divided (up to their rounding).
    assert float(ratio.group(1)) == pytest.approx(pipe_wall / base_wall, abs=0.01)
    # The pipeline does everything the baseline does and more; a pipeline "faster" than
    # raw signing is not issuing what it claims.
    assert pipe_wall < base_wall

    mode, certs, events = stored_counts(data_dir / "fleetward.db")
    assert mode == "wal"
    assert certs == COUNT + WARMUP
    assert events == COUNT + WARMUP


def test_json_output_reports_counts_checks_and_ratio(tmp_path: Path) -> None:
    data_dir = tmp_path / "bench"
    result = run_bench(*SMALL_RUN, "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["pipeline"]["count"] == COUNT
    assert report["baseline"]["count"] == BASELINE_COUNT
    for side in ("pipeline", "baseline"):
        assert report[side]["certs_per_second_wall"] > 0
        assert report[side]["certs_per_cpu_second"] > 0
        assert report[side]["wall_seconds"] > 0
    assert report["ratio_wall"] == pytest.approx(
        report["pipeline"]["certs_per_second_wall"] / report["baseline"]["certs_per_second_wall"],
        rel=0.01,
    )
    assert 0 < report["ratio_wall"] < 1
    assert report["checks"] == {
        "certificates_stored": COUNT + WARMUP,
        "issued_audit_events": COUNT + WARMUP,
        "audit_chain_ok": True,
    }
    assert report["environment"]["cryptography"]
    assert stored_counts(data_dir / "fleetward.db")[1] == COUNT + WARMUP


def test_refuses_a_data_dir_that_already_holds_a_database(tmp_path: Path) -> None:
    # Counting stored rows only proves something if the rows cannot come from an earlier run.
    data_dir = tmp_path / "bench"
    data_dir.mkdir()
    (data_dir / "fleetward.db").write_bytes(b"")
    result = run_bench(*SMALL_RUN, "--data-dir", str(data_dir))
    assert result.returncode != 0
    assert "exists" in result.stderr
    assert "pipeline:" not in result.stdout


@pytest.mark.parametrize("flag", ["--count", "--baseline-count", "--warmup"])
def test_rejects_a_non_positive_count(flag: str) -> None:
    result = run_bench(flag, "0")
    assert result.returncode == 2
    assert "at least 1" in result.stderr


ENROLL_BENCH = REPO / "bench" / "enroll.py"
EST_LINE = re.compile(
    r"^est: (\d+) enrollments/s \(wall\), (\d+) per server-CPU-s  \[N=(\d+), (\d+) clients, "
    r"TLS 1\.3 full handshake, HTTP Basic token, JIT registration, SQLite WAL\]$", re.MULTILINE)
EST_RATIO_LINE = re.compile(rf"^ratio est/pipeline: {NUMBER}$", re.MULTILINE)


def test_enroll_bench_runs_a_real_server_and_checks_what_it_stored() -> None:
    result = subprocess.run(
        [sys.executable, str(ENROLL_BENCH), "--count", "20", "--pipeline-count", "20",
         "--warmup", "2", "--clients", "2", "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["est"]["count"] == 20 and report["pipeline"]["count"] == 20
    assert report["checks"] == {"responses_checked": 20, "certificates_stored": 20,
                                "enroll_audit_events": 20, "devices_active": 20}
    assert report["ratio_wall"] == pytest.approx(
        report["est"]["certs_per_second_wall"] / report["pipeline"]["certs_per_second_wall"],
        rel=0.01)


def test_enroll_bench_text_output_has_the_documented_lines() -> None:
    result = subprocess.run(
        [sys.executable, str(ENROLL_BENCH), "--count", "10", "--pipeline-count", "10",
         "--warmup", "1", "--clients", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    est, ratio = EST_LINE.search(result.stdout), EST_RATIO_LINE.search(result.stdout)
    reference = re.search(r"^pipeline: (\d+) certs/s \(wall\), (\d+) certs/CPU-s  "
                          r"\[N=10, in process, no HTTP\]$", result.stdout, re.MULTILINE)
    assert est and ratio and reference, f"output format drifted:\n{result.stdout}"
    assert est.group(3) == "10" and est.group(4) == "1"
