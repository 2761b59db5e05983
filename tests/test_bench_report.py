"""The benchmark report's arithmetic (bench/report.py), on rows shaped like the harness's."""

from __future__ import annotations

from typing import Any

import pytest

from bench.config import FLOOR
from bench.report import drain_cpu, evaluate_targets, markdown


def scale_row(relays: int, events_per_s: float, relay_cpu: float, postgres: float) -> Any:
    return {
        "system": "outbox",
        "broker": "redis",
        "relays": relays,
        "seconds": 100_000 / events_per_s,
        "events_per_s": events_per_s,
        "received": 100_000,
        "order_violations": 0,
        "duplicates": 0,
        "relay_cpu_seconds": relay_cpu,
        "relay_cpu_s_per_10k": relay_cpu / 10,
        "server_cpu_seconds": {"postgres": postgres, "redis": 0.2, "kafka": 0.0},
    }


def test_drain_cpu_is_the_runs_share_of_the_machine_and_its_ceiling() -> None:
    used, share, ceiling = drain_cpu(scale_row(1, 100_000, 0.6, 0.4), cores=2)
    assert used == pytest.approx(1.2)
    assert share == pytest.approx(60.0)  # 1.2 CPU-s over 1 s of 2 cores
    assert ceiling == pytest.approx(100_000 / 1.2 * 2)
    assert drain_cpu(scale_row(1, 100_000, 0.6, 0.4), cores=None)[1:] == (None, None)


def test_the_scale_out_target_says_what_the_cores_allow() -> None:
    results: dict[str, Any] = {
        "machine": {"cpu_count": 2},
        "scaleout": [scale_row(1, 100_000, 0.6, 0.4), scale_row(4, 90_000, 0.9, 0.8)],
    }
    (target,) = [t for t in evaluate_targets(results) if t["target"].startswith("N relays")]
    assert target["target"] == "N relays keep per-key order, drain >= 1.6x 1 relay"
    assert target["measured"].endswith("1 relay: 100,000 ev/s (0.90x)")
    assert target["status"] == "MISSED"
    assert "12.0 us of CPU per event" in target["note"]
    assert "at most 166,667 ev/s (1.67x one relay)" in target["note"]
    assert "1: 60 %, 4: 86 %" in target["note"]
    results["scaleout"][1] = scale_row(4, 170_000, 1.0, 0.8)
    (target,) = [t for t in evaluate_targets(results) if t["target"].startswith("N relays")]
    assert target["status"] == "met"


def history_row(system: str, broker: str, events_per_s: float, machine_us: float) -> Any:
    return {
        "system": system,
        "broker": broker,
        "events": 100_000,
        "events_per_s": events_per_s,
        "cpu_s_per_10k": 0.06,
        "machine_cpu_us_per_event": machine_us,
        "runs_events_per_s": [events_per_s],
    }


def test_the_history_target_shows_the_machines_cpu_and_the_statement_alone() -> None:
    probe = {"broker": "postgres", "postgres_cpu_us_per_event": 4.8, "wal_bytes_per_event": 662}
    results = {
        "history": [
            history_row("outbox, history off", "kafka", 140_000, 11.2),
            history_row("outbox, history on", "kafka", 93_000, 16.2),
            {**probe, "system": "settle statement, delete_delivered"}
            | {"postgres_cpu_us_per_event": 1.1, "wal_bytes_per_event": 56},
            {**probe, "system": "settle statement, move_delivered"},
        ]
    }
    targets = [t for t in evaluate_targets(results) if t["target"].startswith("delivered")]
    kafka, redis = targets
    assert kafka["status"] == "MISSED"
    assert kafka["measured"] == "0.664x (93,000 vs 140,000 ev/s)"
    assert "machine CPU per event: 16.2 vs 11.2 us" in kafka["note"]
    assert "4.8 us (move) vs 1.1 us (delete), WAL 662 vs 56 bytes" in kafka["note"]
    assert redis["status"] == "not measured"
    assert redis["note"] == ""


def latency_row(system: str, rate: int, p50: float, p99: float, **extra: Any) -> Any:
    return {"system": system, "broker": "kafka", "target_rate": rate}, {
        "achieved_rate": float(rate),
        "committed": 1_000,
        "received": 1_000,
        "p50_ms": p50,
        "p95_ms": p99,
        "p99_ms": p99,
        "max_ms": p99,
        **extra,
    }


def test_the_latency_targets_and_table_show_the_broker_alone_and_the_split() -> None:
    split = {
        "commit_to_broker": {"p50_ms": 0.4, "p99_ms": 2.0},
        "broker_to_consumer": {"p50_ms": 1.0, "p99_ms": 1.9},
        "from_commit_sent": {"p50_ms": 2.0, "p99_ms": 4.2},
        "before_commit_returned": 0,
    }
    rows = [
        latency_row("outbox", 100, 1.4, 3.3, **split),
        latency_row(
            "outbox",
            1_000,
            2.4,
            4.8,
            **split,
            machine_busy_pct=89.6,
            cpu_us_per_event={"relay": 437, "writers": 508, "kafka": 213},
        ),
        latency_row(FLOOR, 100, 0.8, 1.2),
        latency_row(FLOOR, 1_000, 0.7, 2.1),
    ]
    machine = {"date": "-", "cpu_count": 2, "cpu_model": "-", "memory_gib": 1, "python": "-"}
    results: dict[str, Any] = {
        "latency": [base | row for base, row in rows],
        "mode": "full",
        "wall_seconds": 1.0,
        "machine": machine | {"postgres": "-", "kafka": "-", "redis": "-"},
    }
    results["targets"] = evaluate_targets(results)
    targets = {t["target"]: t for t in results["targets"]}
    low = targets["kafka at 100/s: p99 <= 3 ms"]
    assert (low["status"], low["note"]) == ("MISSED", f"{FLOOR}: p50 0.8 ms, p99 1.2 ms")
    high = targets["kafka at 1,000/s: p50 <= 8 ms, p99 <= 5 ms"]
    assert high["status"] == "met"
    assert high["note"] == f"{FLOOR}: p50 0.7 ms, p99 2.1 ms; machine 90 % busy"
    text = markdown(results)
    assert "| outbox | 100 | 1.4 / 3.3 | 0.4 / 2.0 | 1.0 / 1.9 | 0.8 / 1.2 |" in text
    assert f"| {FLOOR} | kafka | 1,000 | 1,000 | 0.7 |" in text  # no COMMIT for the floor
    assert "| outbox | kafka | 1,000 | 90 | 508 | - | 437 | - | - | 213 | - | - |" in text


def overhead_mode(latency_pct: float, loss_pct: float) -> dict[str, float]:
    return {
        "added_latency_pct": latency_pct,
        "throughput_loss_pct": loss_pct,
        "added_p50_ms": -0.05,
        "added_cpu_ms_per_tx": 0.2,
    }


def test_the_writer_overhead_target_signs_a_gain_as_a_gain() -> None:
    """A run where the outbox row measured faster (noise) read "+-8.6 % latency, --12.3 %"."""
    block = {"enqueue": overhead_mode(-8.6, -12.3), "outbox": overhead_mode(9.7, 6.3)}
    results: dict[str, Any] = {"overhead": [{"checkout": block, "order": block}]}
    (target,) = [t for t in evaluate_targets(results) if t["target"].startswith("writer overhead")]
    assert target["measured"] == "-8.6 % latency, +12.3 % throughput"
    assert target["status"] == "met"
    assert target["note"].startswith("checkout with `session.add(OutboxEvent)`: +9.7 % / -6.3 %")
