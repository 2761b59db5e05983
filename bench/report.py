"""Results -> latest.json, latest.md (tables + targets) and latest.png (bars and latency CDFs)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.config import FLOOR, TARGETS

Result = dict[str, Any]

DEBEZIUM = (
    "not run: Debezium is Java; PyPI has no maintained Python package for it, and its embedded "
    "engine would need a JVM harness (Maven + a Java main) beside this Python one. Kafka "
    "Connect + the Debezium Postgres connector (logical decoding) is the way to compare it."
)


def _ok(rows: Iterable[Result]) -> list[Result]:
    return [r for r in rows if "error" not in r]


def _signed(value: float, unit: str = "%") -> str:
    """A change with its one sign: +21.4 %, -8.6 % (a negative value read "+-8.6 %")."""
    return f"{'+' if value >= 0 else ''}{value} {unit}"


def _overhead(ran: Result) -> str:
    """What the outbox row added: latency, then throughput (a loss is negative)."""
    return f"{_signed(ran['added_latency_pct'])} / {_signed(-ran['throughput_loss_pct'])}"


def _added(ran: Result) -> str:
    return (
        f"latency {_signed(ran['added_latency_pct'])} (p50 {_signed(ran['added_p50_ms'], 'ms')}),"
        f" throughput {_signed(-ran['throughput_loss_pct'])},"
        f" writer CPU {_signed(ran['added_cpu_ms_per_tx'], 'ms')}"
    )


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MB"


def reference_drain(results: Result, system: str, broker: str) -> Result | None:
    """The drain quoted against targets: the largest size up to 100k (the smallest otherwise)."""
    rows = [
        r for r in _ok(results.get("drain", [])) if r["system"] == system and r["broker"] == broker
    ]
    if not rows:
        return None
    small = [r for r in rows if r["events"] <= 100_000]
    pool = small or rows
    return max(pool, key=lambda r: r["events"]) if small else min(pool, key=lambda r: r["events"])


def _status(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "MISSED")


def _target(name: str, measured: str, ok: bool | None, note: str = "") -> Result:
    return {"target": name, "measured": measured, "status": _status(ok), "note": note}


def _on_off_targets(
    results: Result, workload: str, systems: tuple[str, str], name: str, goal: float
) -> list[Result]:
    """Per broker: the drain of `systems[1]` (a feature on) against `systems[0]` (off), as a
    ratio of the median runs, with the CPU and every run beside it."""
    out: list[Result] = []
    for broker in ("kafka", "redis"):
        modes = {r["system"]: r for r in _ok(results.get(workload, [])) if r["broker"] == broker}
        off, on = modes.get(systems[0]), modes.get(systems[1])
        label = name.format(goal=goal, broker=broker)
        if not (off and on):
            out.append(_target(label, "-", None))
            continue
        ratio = on["events_per_s"] / off["events_per_s"]
        machine = ""
        if on.get("machine_cpu_us_per_event") and off.get("machine_cpu_us_per_event"):
            machine = (
                f"; machine CPU per event: {on['machine_cpu_us_per_event']} vs "
                f"{off['machine_cpu_us_per_event']} us"
            )
        out.append(
            _target(
                label,
                f"{ratio:.3f}x ({on['events_per_s']:,.0f} vs {off['events_per_s']:,.0f} ev/s)",
                ratio >= goal,
                f"relay CPU per 10k events: {on['cpu_s_per_10k']} vs {off['cpu_s_per_10k']} s"
                f"{machine}; runs {on.get('runs_events_per_s')} vs "
                f"{off.get('runs_events_per_s')}",
            )
        )
    return out


def evaluate_targets(results: Result) -> list[Result]:
    t = TARGETS
    out: list[Result] = []
    for broker, goal in (("kafka", t.kafka_drain), ("redis", t.redis_drain)):
        ref = reference_drain(results, "outbox", broker)
        out.append(
            _target(
                f"drain >= {goal:,.0f} ev/s, {broker}, one relay",
                f"{ref['events_per_s']:,.0f} ev/s at {ref['events']:,}" if ref else "-",
                None if ref is None else ref["events_per_s"] >= goal,
            )
        )
    scale = {r["relays"]: r for r in _ok(results.get("scaleout", [])) if r["system"] == "outbox"}
    if scale:
        most, one = scale[max(scale)], scale.get(1)
        ok = most["order_violations"] == 0 and (
            one is None or most["events_per_s"] >= t.scale_ratio * one["events_per_s"]
        )
        versus = (
            f"{one['events_per_s']:,.0f} ev/s ({most['events_per_s'] / one['events_per_s']:.2f}x)"
            if one
            else "-"
        )
        measured = (
            f"{max(scale)} relays: {most['events_per_s']:,.0f} ev/s, "
            f"{most['order_violations']} order violations; 1 relay: {versus}"
        )
        out.append(
            _target(
                f"N relays keep per-key order, drain >= {t.scale_ratio}x 1 relay",
                measured,
                ok,
                _scale_note(scale, results.get("machine", {}).get("cpu_count")),
            )
        )
    else:
        out.append(
            _target(f"N relays keep per-key order, drain >= {t.scale_ratio}x 1 relay", "-", None)
        )
    for broker in ("kafka", "redis"):
        ours = {
            r["events"]: r
            for r in _ok(results.get("drain", []))
            if r["system"] == "outbox" and r["broker"] == broker
        }
        for system, name, goal in (
            ("naive", "the naive floor", t.naive_ratio),
            ("lean", "the lean ceiling", t.lean_ratio),
        ):
            other = {
                r["events"]: r
                for r in _ok(results.get("drain", []))
                if r["system"] == system and r["broker"] == broker
            }
            common = sorted(set(ours) & set(other))
            if not common:
                out.append(_target(f">= {goal}x {name}, {broker}", "-", None))
                continue
            size = common[-1] if common[-1] <= 100_000 else common[0]
            ratio = ours[size]["events_per_s"] / other[size]["events_per_s"]
            out.append(
                _target(f">= {goal}x {name}, {broker}", f"{ratio:.2f}x at {size:,}", ratio >= goal)
            )
        for row in _ok(results.get("drain", [])):
            if row["broker"] != broker or "waiting" not in row:
                continue
            plain = ours.get(row["events"])
            ratio = row["events_per_s"] / plain["events_per_s"] if plain else None
            out.append(
                _target(
                    f"{row['waiting']:,} waiting rows of other keys: drain >= "
                    f"{t.waiting_ratio}x without, {broker}",
                    "-" if ratio is None else f"{ratio:.2f}x at {row['events']:,}",
                    None if ratio is None else ratio >= t.waiting_ratio,
                )
            )
        ref = reference_drain(results, "outbox", broker)
        fs = [
            r
            for r in _ok(results.get("drain", []))
            if r["system"].startswith("faststream") and r["broker"] == broker
        ]
        if ref and fs:
            best = max(fs, key=lambda r: r["events_per_s"])
            ratio = ref["events_per_s"] / best["events_per_s"]
            out.append(
                _target(
                    f">= {t.faststream_ratio:.0f}x faststream-outbox, {broker}",
                    f"{ratio:.1f}x (vs its best, {best['system']})",
                    ratio >= t.faststream_ratio,
                )
            )
        else:
            out.append(
                _target(f">= {t.faststream_ratio:.0f}x faststream-outbox, {broker}", "-", None)
            )
    for broker in ("kafka", "redis"):
        rows = [
            r
            for r in _ok(results.get("latency", []))
            if r["system"] == "outbox" and r["broker"] == broker
        ]
        if rows:
            row = min(rows, key=lambda r: abs(r["target_rate"] - t.latency_rate))
            note = (
                ""
                if row["target_rate"] == t.latency_rate
                else f"measured at {row['target_rate']}/s"
            )
            variants = {"outbox, jit=off": "with Postgres jit=off"}
            for r in _ok(results.get("latency", [])):
                if r["broker"] != broker or not r["system"].startswith("outbox, "):
                    continue
                label = variants.get(r["system"], r["system"].removeprefix("outbox, "))
                note += "; " if note else ""
                note += f"{label}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
            floor = _floor_note(results, broker, row["target_rate"])
            note += "; " if note and floor else ""
            note += floor
            if row.get("machine_busy_pct") is not None:
                note += f"; machine {row['machine_busy_pct']:.0f} % busy"
            out.append(
                _target(
                    f"{broker} at {t.latency_rate:,}/s: "
                    f"p50 <= {t.p50_ms:.0f} ms, p99 <= {t.p99_ms:.0f} ms",
                    f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms",
                    row["p50_ms"] <= t.p50_ms and row["p99_ms"] <= t.p99_ms,
                    note,
                )
            )
        else:
            out.append(_target(f"{broker} latency at {t.latency_rate:,}/s", "-", None))
        low = [r for r in rows if r["target_rate"] == t.latency_low_rate]
        name = f"{broker} at {t.latency_low_rate:,}/s: p99 <= {t.p99_low_ms:.0f} ms"
        if low:
            measured = f"p50 {low[0]['p50_ms']:.1f} ms, p99 {low[0]['p99_ms']:.1f} ms"
            floor = _floor_note(results, broker, t.latency_low_rate)
            out.append(_target(name, measured, low[0]["p99_ms"] <= t.p99_low_ms, floor))
        else:
            out.append(_target(name, "-", None))
    over = _ok(results.get("overhead", []))
    name = f"writer overhead <= {t.writer_overhead_pct:.0f} % (checkout, `enqueue`)"
    if over:
        checkout, order = over[0]["checkout"], over[0]["order"]
        fast = checkout["enqueue"]

        out.append(
            _target(
                name,
                f"{_signed(fast['added_latency_pct'])} latency, "
                f"{_signed(-fast['throughput_loss_pct'])} throughput",
                max(fast["added_latency_pct"], fast["throughput_loss_pct"])
                <= t.writer_overhead_pct,
                f"checkout with `session.add(OutboxEvent)`: {_overhead(checkout['outbox'])}; "
                f"one-row transaction: `enqueue` {_overhead(order['enqueue'])}, "
                f"`session.add` {_overhead(order['outbox'])}",
            )
        )
    else:
        out.append(_target(name, "-", None))
    out += _on_off_targets(
        results,
        "metrics",
        ("outbox, metrics off", "outbox, metrics scraped"),
        "metrics recorded and scraped: drain >= {goal}x metrics off, {broker}",
        t.metrics_ratio,
    )
    history = _on_off_targets(
        results,
        "history",
        ("outbox, history off", "outbox, history on"),
        "delivered history on: drain >= {goal}x history off, {broker}",
        t.history_ratio,
    )
    probes = {r["system"]: r for r in _ok(results.get("history", [])) if r["broker"] == "postgres"}
    delete = probes.get("settle statement, delete_delivered")
    move = probes.get("settle statement, move_delivered")
    if delete and move:
        for target in (t for t in history if t["status"] != "not measured"):
            target["note"] += (
                f"; the settle statement alone, Postgres CPU per event: "
                f"{move['postgres_cpu_us_per_event']} us (move) vs "
                f"{delete['postgres_cpu_us_per_event']} us (delete), WAL "
                f"{move['wal_bytes_per_event']} vs {delete['wal_bytes_per_event']} bytes"
            )
    out += history
    for broker in ("kafka", "redis"):
        modes = {r["system"]: r for r in _ok(results.get("prune", [])) if r["broker"] == broker}
        alone = modes.get("outbox, history on, alone")
        during = modes.get("outbox, history on, pruning")
        pruned = modes.get("prune outbox_delivered")
        name = (
            f"retention: drain while pruning >= {t.prune_ratio}x without, prune statements "
            f"<= {t.prune_statement_ms:.0f} ms, {broker}"
        )
        if alone and during and pruned:
            ratio = during["events_per_s"] / alone["events_per_s"]
            longest = pruned["longest_statement_ms"] or 0.0
            out.append(
                _target(
                    name,
                    f"{ratio:.3f}x ({during['events_per_s']:,.0f} vs "
                    f"{alone['events_per_s']:,.0f} ev/s), longest {longest} ms",
                    ratio >= t.prune_ratio and longest <= t.prune_statement_ms,
                    f"{pruned['rows_deleted']:,} rows in {pruned['prune_seconds']} s "
                    f"({pruned['rows_during_drains']:,} during the drains), "
                    f"{pruned['statements']} statements, "
                    f"{pruned['statements_over_100ms']} over 100 ms; runs "
                    f"{during.get('runs_events_per_s')} vs {alone.get('runs_events_per_s')}",
                )
            )
        else:
            out.append(_target(name, "-", None))
    for broker in ("kafka", "redis"):
        modes = {r["system"]: r for r in _ok(results.get("envelope", [])) if r["broker"] == broker}
        plain = modes.pop("outbox, envelope plain", None)
        for system, row in modes.items():
            name = (
                f"{system.removeprefix('outbox, ')}: drain >= {t.envelope_ratio}x plain, {broker}"
            )
            if plain is None:
                out.append(_target(name, "-", None))
                continue
            ratio = row["events_per_s"] / plain["events_per_s"]
            out.append(
                _target(
                    name,
                    f"{ratio:.2f}x ({row['events_per_s']:,.0f} vs "
                    f"{plain['events_per_s']:,.0f} ev/s at {row['events']:,})",
                    ratio >= t.envelope_ratio,
                    f"CPU per 10k events: {row['cpu_s_per_10k']} vs {plain['cpu_s_per_10k']} s; "
                    f"runs {row.get('runs_events_per_s')} vs {plain.get('runs_events_per_s')}",
                )
            )
    for broker in ("kafka", "redis"):
        rows = [r for r in _ok(results.get("longtx", [])) if r["broker"] == broker]
        name = (
            f"snapshot held open: last tenth of the drain >= {t.long_txn_ratio}x the first, "
            f"{broker}"
        )
        if rows and rows[0]["last_vs_first"] is not None:
            row = rows[0]
            out.append(
                _target(
                    name,
                    f"{row['last_vs_first']:.2f}x at {row['events']:,}",
                    row["last_vs_first"] >= t.long_txn_ratio,
                    "ev/s per tenth: " + ", ".join(f"{r:,.0f}" for r in row["tenths_events_per_s"]),
                )
            )
        else:
            out.append(_target(name, "-", None))
    for broker in ("kafka", "redis"):
        rows = sorted(
            (
                r
                for r in _ok(results.get("topics", []))
                if r["broker"] == broker and not r.get("first_drain")
            ),
            key=lambda r: r["topics"],
        )
        name = f"drain over many topics >= {t.topics_ratio}x one topic, fresh relay, {broker}"
        if len(rows) >= 2 and rows[0]["topics"] == 1:
            one, many = rows[0], rows[-1]
            ratio = many["events_per_s"] / one["events_per_s"]
            out.append(
                _target(
                    name,
                    f"{ratio:.2f}x ({many['events_per_s']:,.0f} ev/s over {many['topics']:,} "
                    f"topics vs {one['events_per_s']:,.0f} over 1, {one['events']:,} events)",
                    ratio >= t.topics_ratio,
                    f"runs {many.get('runs_events_per_s')} vs {one.get('runs_events_per_s')}",
                )
            )
        else:
            out.append(_target(name, "-", None))
    modes = {r["system"]: r for r in _ok(results.get("notify", []))}
    off, on = modes.get("writers, notify off"), modes.get("writers, notify on")
    name = f"writers with the default NOTIFY >= {t.notify_ratio}x notify off"
    if off and on:
        ratio = on["tx_per_s"] / off["tx_per_s"]
        out.append(
            _target(
                name,
                f"{ratio:.2f}x ({on['tx_per_s']:,} vs {off['tx_per_s']:,} tx/s, "
                f"{on['writers']} writers)",
                ratio >= t.notify_ratio,
                f"p50/p99 {on['p50_ms']}/{on['p99_ms']} ms vs {off['p50_ms']}/{off['p99_ms']} ms; "
                f"runs {on['runs_tx_per_s']} vs {off['runs_tx_per_s']}",
            )
        )
    else:
        out.append(_target(name, "-", None))
    rss = [
        r["peak_rss_mb"]
        for r in _ok(results.get("cost", [])) + _ok(results.get("scaleout", []))
        if r.get("system") == "outbox" and "peak_rss_mb" in r
    ]
    out.append(
        _target(
            f"relay peak RSS <= {t.rss_mb:.0f} MB",
            f"{max(rss):.0f} MB" if rss else "-",
            None if not rss else max(rss) <= t.rss_mb,
        )
    )
    for broker in ("kafka", "redis"):
        rows = sorted(
            (
                r
                for r in _ok(results.get("drain", []))
                if r["system"] == "outbox" and r["broker"] == broker
            ),
            key=lambda r: r["events"],
        )
        name = f"drain at 1M within {t.big_drain_drop_pct:.0f} % of 10k, {broker}"
        if len(rows) >= 2 and rows[-1]["events"] >= 1_000_000:
            small, big = rows[0], rows[-1]
            drop = (1 - big["events_per_s"] / small["events_per_s"]) * 100
            out.append(
                _target(
                    name,
                    f"{big['events_per_s']:,.0f} vs {small['events_per_s']:,.0f} ev/s "
                    f"({-drop:+.1f} %)",
                    drop <= t.big_drain_drop_pct,
                )
            )
        else:
            out.append(_target(name, "-", None, "1M not in --sizes"))
    return out


OVERHEAD_TITLES = {
    "order": "one `orders` row (the smallest transaction)",
    "checkout": "checkout (lock 3 products, lower stock, insert an order and 3 lines)",
}


def drain_cpu(r: Result, cores: int | None) -> tuple[float, float | None, float | None]:
    """A drain's CPU over its own window, from process accounting: relay and servers in
    CPU-seconds, that as a share of the machine (%), and the rate the machine's cores would
    allow at that cost per event (the CPU ceiling)."""
    used = r["relay_cpu_seconds"] + sum(r.get("server_cpu_seconds", {}).values())
    if not cores or not used:
        return used, None, None
    return used, 100 * used / (cores * r["seconds"]), r["received"] / used * cores


def _scale_note(scale: dict[int, Result], cores: int | None) -> str:
    """What tells a CPU ceiling from a coordination one: the share of the machine each run
    used, and the ceiling one relay's CPU per event leaves for N."""
    one = scale.get(1)
    if one is None or not cores:
        return ""
    used, _, ceiling = drain_cpu(one, cores)
    assert ceiling is not None
    shares = ", ".join(f"{n}: {drain_cpu(r, cores)[1]:.0f} %" for n, r in sorted(scale.items()))
    return (
        f"1 relay: {1e6 * used / one['received']:.1f} us of CPU per event (relay and servers):"
        f" {cores} cores allow at most {ceiling:,.0f} ev/s"
        f" ({ceiling / one['events_per_s']:.2f}x one relay); share of the machine used,"
        f" by relays: {shares}"
    )


def _overhead_table(block: dict[str, Any]) -> list[str]:
    modes = [m for m in block if isinstance(block[m], dict)]
    return _table(
        [
            "transaction",
            "tx/s",
            "mean ms",
            "p50 ms",
            "p99 ms",
            "writer CPU ms/tx",
            "writer CPU %",
            "vs plain: latency / throughput",
        ],
        [
            [
                mode,
                _fmt(block[mode]["tx_per_s"], 0),
                _fmt(block[mode]["mean_ms"], 2),
                _fmt(block[mode]["p50_ms"], 2),
                _fmt(block[mode]["p99_ms"], 2),
                _fmt(block[mode]["writer_cpu_ms_per_tx"], 3),
                _fmt(block[mode]["writer_cpu_pct"], 0),
                _overhead(block[mode]) if "added_latency_pct" in block[mode] else "-",
            ]
            for mode in modes
        ],
    )


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _errors(rows: list[Result], label: str) -> list[str]:
    return [f"- {label} {_describe(r)}: **failed**: {r['error']}" for r in rows if "error" in r]


def _describe(r: Result) -> str:
    keys = ("system", "broker", "events", "target_rate", "relays")
    return " ".join(str(r[k]) for k in keys if k in r)


def markdown(results: Result) -> str:
    m = results["machine"]
    lines = [
        f"# Outbox benchmark ({results['mode']} run)",
        "",
        f"{m['date']} · {m['cpu_count']} x {m['cpu_model']} · {m['memory_gib']} GiB · "
        f"Python {m['python']} · Postgres {m['postgres']} · Kafka {m['kafka']} · Redis {m['redis']}"
        f" · wall time {results['wall_seconds']:.0f} s",
        "",
    ]
    git = m.get("git") or {}
    changed = [f for f in git.get("uncommitted", []) if not f.startswith(("bench/", "docs/"))]
    lines += [
        f"Code measured: commit `{str(git.get('commit', ''))[:10]}`"
        + (f", with uncommitted changes in {', '.join(changed)}" if changed else "")
        + ".",
        "",
    ]
    if results["mode"] == "quick":
        lines += [
            "Quick run: toy sizes that prove the harness works. Do not quote these numbers.",
            "",
        ]
    if results.get("other_activity"):
        lines += [
            f"Note: {results['other_activity']} other backend(s) were busy on the same Postgres "
            "when the run started (others testing): figures may be noisy.",
            "",
        ]
    lines += ["## Targets (reported, never asserted)", ""]
    lines += _table(
        ["target", "measured", "status", "note"],
        [[t["target"], t["measured"], t["status"], t["note"]] for t in results["targets"]],
    )
    drain = results.get("drain", [])
    if drain:
        lines += [
            "## Drain: N pending events, relay started cold, until all acked and deleted",
            "",
            "Median of the runs listed in the last column (runs up to 100k are repeated).",
            "",
        ]
        lines += _table(
            [
                "system",
                "broker",
                "events",
                "seconds",
                "events/s",
                "CPU s / 10k",
                "dead tuples",
                "table size",
                "machine CPU %",
                "all runs, ev/s",
            ],
            [
                [
                    r["system"],
                    r["broker"],
                    _fmt(r["events"]),
                    _fmt(r["seconds"], 2),
                    _fmt(r["events_per_s"], 0),
                    _fmt(r.get("cpu_s_per_10k"), 2),
                    _fmt(r.get("dead_tuples")),
                    _mb(r.get("table_bytes")),
                    _fmt(r.get("machine_cpu_pct"), 0),
                    ", ".join(_fmt(v, 0) for v in r.get("runs_events_per_s", [])),
                ]
                for r in _ok(drain)
            ],
        )
        lines += _errors(drain, "drain")
    latency = results.get("latency", [])
    if latency:
        lines += ["## Latency under steady load: commit returned -> consumer received", ""]
        config = results.get("config", {})
        if "latency_lead_in" in config:
            lines += [
                f"Each run measures {config['latency_seconds']} s of commits, after"
                f" {config['latency_lead_in']} s of the same load left out (a cold start:"
                " a new topic, each process's first runs).",
                "",
            ]
        lines += _table(
            [
                "system",
                "broker",
                "target/s",
                "achieved/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "p50 / p99 from COMMIT sent",
                "received",
                "before commit returned",
                "machine CPU %",
            ],
            [
                [
                    r["system"],
                    r["broker"],
                    _fmt(r["target_rate"]),
                    _fmt(r["achieved_rate"], 0),
                    _fmt(r["p50_ms"]),
                    _fmt(r["p95_ms"]),
                    _fmt(r["p99_ms"]),
                    _fmt(r["max_ms"]),
                    _p50_p99(r.get("from_commit_sent")),
                    f"{r['received']:,}/{r['committed']:,}",
                    _fmt(r.get("before_commit_returned")),
                    _fmt(r.get("machine_cpu_pct"), 0),
                ]
                for r in _ok(latency)
            ],
        )
        lines += _broker_split(_ok(latency))
        lines += _latency_cpu(_ok(latency))
        lines += _errors(latency, "latency")
    for o in results.get("overhead", []):
        if "error" in o:
            lines += ["## Writer overhead", "", *_errors([o], "overhead")]
            continue
        for business, title in OVERHEAD_TITLES.items():
            lines += [f"## Writer overhead: {title}, with and without an OutboxEvent", ""]
            lines += _overhead_table(o[business])
            ran, fast = o[business]["outbox"], o[business]["enqueue"]
            lines += [
                f"`session.add(OutboxEvent(...))`: {_added(ran)} per transaction. "
                f"`await enqueue(session, ...)`: {_added(fast)}. {o['concurrency']} concurrent "
                "writers in one process, closed loop, no relay.",
                "",
            ]
    many = results.get("topics", [])
    if many:
        lines += [
            "## Many topics: the same events over 1 topic and over many, fresh relay each",
            "",
            "`outbox-relay run` started for each drain; seconds from its registration (before "
            "its publisher starts: the cold start is in) to the empty outbox. Median of the runs "
            "in the last column. The first drain after creating the topics is on a row of its "
            "own, outside the target: it measures Kafka's own warm-up more than the relay. "
            "After it, before the runs compared, the harness makes Kafka write the first index "
            "entries of the many topics' partitions (the first write into each preallocated "
            "index file; `index warm-up s`), which existing topics are past.",
            "",
        ]
        lines += _table(
            [
                "broker",
                "topics",
                "drain",
                "events",
                "seconds",
                "events/s",
                "startup s",
                "index warm-up s",
                "all runs, ev/s",
            ],
            [
                [
                    r["broker"],
                    _fmt(r["topics"]),
                    "first after creating them" if r.get("first_drain") else "topics existing",
                    _fmt(r["events"]),
                    _fmt(r["seconds"], 2),
                    _fmt(r["events_per_s"], 0),
                    _fmt(r["startup_s"], 2),
                    _fmt(r.get("index_warmup_s"), 1),
                    ", ".join(_fmt(v, 0) for v in r.get("runs_events_per_s", [])),
                ]
                for r in _ok(many)
            ],
        )
        lines += _errors(many, "many topics")
    cost = results.get("cost", [])
    if cost:
        lines += ["## Cost: `outbox-relay run` subprocess draining N events", ""]
        lines += _table(
            [
                "broker",
                "events",
                "events/s",
                "relay CPU s / 10k",
                "relay CPU %",
                "peak RSS",
                "Postgres CPU s",
                "broker CPU s",
                "dead tuples after",
                "table size after",
            ],
            [
                [
                    r["broker"],
                    _fmt(r["events"]),
                    _fmt(r["events_per_s"], 0),
                    _fmt(r["relay_cpu_s_per_10k"], 2),
                    _fmt(r["relay_cpu_util_pct"], 0),
                    f"{r['peak_rss_mb']:.0f} MB",
                    _fmt(r["server_cpu_seconds"]["postgres"]),
                    _fmt(r["server_cpu_seconds"][r["broker"]]),
                    _fmt(r.get("dead_tuples")),
                    _mb(r.get("table_bytes")),
                ]
                for r in _ok(cost)
            ],
        )
        lines += _errors(cost, "cost")
    scale = results.get("scaleout", [])
    if scale:
        cores = results.get("machine", {}).get("cpu_count")
        lines += ["## Scale-out on one table (Redis), per-key order checked at the consumer", ""]
        lines += _table(
            [
                "system",
                "processes",
                "events",
                "events/s",
                "order violations",
                "duplicates",
                "relay CPU s / 10k",
                "relay + server CPU s",
                "of the machine %",
                "CPU ceiling ev/s",
            ],
            [
                [
                    r["system"],
                    _fmt(r["relays"]),
                    _fmt(r["received"]),
                    _fmt(r["events_per_s"], 0),
                    _fmt(r["order_violations"]),
                    _fmt(r["duplicates"]),
                    _fmt(r["relay_cpu_s_per_10k"], 2),
                    *(_fmt(v, d) for v, d in zip(drain_cpu(r, cores), (2, 0, 0), strict=True)),
                ]
                for r in _ok(scale)
            ],
        )
        lines += [
            "CPU over each drain's own window (process accounting: the relays, Postgres, Redis,"
            " Kafka). The ceiling is the rate the machine's cores would allow at that run's CPU"
            " per event: a run near 100 % of the machine is CPU-bound, one far below it waits on"
            " something else.",
            "",
        ]
        lines += _errors(scale, "scale-out")
    for p in results.get("profile", []):
        lines += [f"## Profile: py-spy on `outbox-relay run` during a {p['broker']} drain", ""]
        if "error" in p:
            lines += _errors([p], "profile")
            continue
        servers = ", ".join(f"{k} {v} s" for k, v in p["server_cpu_seconds"].items())
        lines += [
            f"{p['events']:,} events in {p['seconds']} s ({_fmt(p['events_per_s'], 0)} ev/s). "
            f"CPU over the drain: relay {p['relay_cpu_seconds']} s "
            f"({p['relay_cpu_util_pct']} % of one core); {servers}. "
            "The relay runs on asyncio's loop here (`--event-loop asyncio`; py-spy cannot "
            "see into uvloop's C). "
            f"py-spy samples the relay at 250 Hz; shares below are of its busy samples "
            f"(idle in the event loop: {p['idle_pct_of_window']} % of the recording window, "
            "which also spans the second before and after the drain).",
            "",
        ]
        lines += _table(
            ["self time by component", "%"],
            [[name, _fmt(pct)] for name, pct in p["self_by_component_pct_of_busy"]],
        )
        lines += _table(
            ["self time, top functions", "%"],
            [[f"`{name}`", _fmt(pct)] for name, pct in p["top_self_pct_of_busy"][:12]],
        )
        lines += _table(
            ["relay functions, inclusive", "%"],
            [[f"`{name}`", _fmt(pct)] for name, pct in p["relay_inclusive_pct_of_busy"][:12]],
        )
    lines += ["## Not run", ""]
    lines += [f"- {name}: {why}" for name, why in results.get("not_run", {}).items()]
    lines += [""]
    return "\n".join(lines)


def plot(results: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, cdf, scale) = plt.subplots(1, 3, figsize=(18, 5.5))
    systems = ["outbox", "naive", "lean", "faststream-tuned", "faststream-defaults"]
    width = 0.38
    for offset, broker in ((-width / 2, "kafka"), (width / 2, "redis")):
        values = []
        for system in systems:
            ref = reference_drain(results, system, broker)
            values.append(ref["events_per_s"] if ref else 0.0)
        xs = [i + offset for i in range(len(systems))]
        drawn = bars.bar(xs, values, width, label=broker)
        bars.bar_label(drawn, labels=[f"{v:,.0f}" for v in values], fontsize=7)
    bars.set_xticks(range(len(systems)), systems, rotation=15)
    bars.set_ylabel("events/s")
    bars.set_title("Drain, one process (largest run up to 100k events)")
    bars.legend()
    for r in _ok(results.get("latency", [])):
        points = r.get("cdf_ms") or []
        if points:
            cdf.plot(
                [max(p[0], 0.01) for p in points],
                [p[1] for p in points],
                label=f"{r['system']} {r['broker']} {r['target_rate']}/s",
            )
    cdf.set_xscale("log")
    cdf.set_xlabel("commit returned -> consumer, ms (log; <= 0 drawn at 0.01)")
    cdf.set_ylabel("fraction of events")
    cdf.set_title("Latency CDF under steady load")
    cdf.grid(True, which="both", alpha=0.3)
    if cdf.lines:
        cdf.legend(fontsize=7)
    rows = _ok(results.get("scaleout", []))
    labels = [f"{r['system']} x{r['relays']}" for r in rows]
    drawn = scale.bar(
        range(len(rows)),
        [r["events_per_s"] for r in rows],
        color=["tab:red" if r["order_violations"] else "tab:green" for r in rows],
    )
    scale.bar_label(drawn, labels=[f"{r['order_violations']} viol." for r in rows], fontsize=7)
    scale.set_xticks(range(len(rows)), labels, rotation=15)
    scale.set_ylabel("events/s")
    scale.set_title("Scale-out, Redis (red: per-key order broken)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floor_note(results: Result, broker: str, rate: int) -> str:
    """The same rate sent straight to the broker, for the reader to tell the relay's part."""
    for r in _ok(results.get("latency", [])):
        if r["system"] == FLOOR and r["broker"] == broker and r["target_rate"] == rate:
            return f"{FLOOR}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
    return ""


def _p50_p99(summary: Result | None) -> str:
    if not summary:
        return "-"
    return f"{_fmt(summary['p50_ms'])} / {_fmt(summary['p99_ms'])}"


def _broker_split(rows: list[Result]) -> list[str]:
    """Where the milliseconds go on Kafka: before and after the broker appended each event,
    beside records sent to the broker alone at the same rate."""
    split = [r for r in rows if r.get("commit_to_broker")]
    if not split:
        return []
    floors = {r["target_rate"]: r for r in rows if r["system"] == FLOOR and r["broker"] == "kafka"}
    return [
        "Kafka, each event's path cut where the broker appended it (the topic's"
        " `LogAppendTime`, kept to the millisecond: the first part reads up to 1 ms short, the"
        f' second up to 1 ms long), and "{FLOOR}" at the same rate: records sent straight to'
        " the broker, one at a time, by the relay's client (bench/broker_floor.py).",
        "",
        *_table(
            [
                "system",
                "target/s",
                "commit -> consumer p50 / p99 ms",
                "commit -> broker append",
                "append -> consumer",
                f"{FLOOR}: send -> consumer",
            ],
            [
                [
                    r["system"],
                    _fmt(r["target_rate"]),
                    f"{_fmt(r['p50_ms'])} / {_fmt(r['p99_ms'])}",
                    _p50_p99(r["commit_to_broker"]),
                    _p50_p99(r["broker_to_consumer"]),
                    _p50_p99(floors.get(r["target_rate"])),
                ]
                for r in split
            ],
        ),
    ]


#: The parts of a latency run whose CPU is shown, in the order of an event's path.
CPU_ROLES = (
    "writers",
    "postgres for writers",
    "relay",
    "postgres for the relay",
    "postgres",
    "kafka",
    "redis",
    "consumer (harness)",
)


def _latency_cpu(rows: list[Result]) -> list[str]:
    """CPU per event of each part of the machine, in the measured window of each run."""
    shown = [r for r in rows if r.get("cpu_us_per_event")]
    if not shown:
        return []
    return [
        "CPU per event committed, in us, of each part of the machine over each run's measured"
        ' window ("postgres for ...": the backends serving it, by `application_name`;'
        ' "postgres": its own processes), and how busy the machine\'s cores were: the'
        " writers stand in for the application, whose CPU the relay shares.",
        "",
        *_table(
            ["system", "broker", "target/s", "machine busy %", *CPU_ROLES],
            [
                [
                    r["system"],
                    r["broker"],
                    _fmt(r["target_rate"]),
                    _fmt(r.get("machine_busy_pct"), 0),
                    *(_fmt(r["cpu_us_per_event"].get(role)) for role in CPU_ROLES),
                ]
                for r in shown
            ],
        ),
    ]


def write(results: Result, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate_targets(results)
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "latest.md").write_text(markdown(results))
    plot(results, out / "latest.png")
