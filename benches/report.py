#!/usr/bin/env python3
"""Prints BENCHMARKS.md's ratio tables from criterion's estimates of the last run.

Run after `cargo bench --bench overhead --bench contention --bench replay`. Every ratio
compares figures measured in the same run (median point estimates).
"""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"


def median_ns(group, bench):
    path = ROOT / group / bench / "new" / "estimates.json"
    return json.loads(path.read_text())["median"]["point_estimate"]


def overhead(group):
    names = ["floor", "add_authorization", "auth_layer_static", "auth_layer_expiring",
             "auth_layer_no_replay", "rwlock_cache", "mutex_cache", "watch_receiver"]
    t = {n: median_ns(group, n) for n in names}
    print(f"\n{group} (one request, request building included)\n")
    print("| variant | ns/request | over floor (ns) | x AddAuthorization |")
    print("|---|---|---|---|")
    for n in names:
        print(f"| {n} | {t[n]:.0f} | {t[n] - t['floor']:.0f} | {t[n] / t['add_authorization']:.2f} |")
    return t


def contention(single):
    names = ["floor", "add_authorization", "auth_layer_static", "auth_layer_expiring",
             "auth_layer_no_replay", "rwlock_cache", "mutex_cache", "watch_receiver"]
    t = {n: median_ns("contention", n) for n in names}
    print("\ncontention (2 threads, one shared service; throughput = 2 requests per ns-per-request-per-thread)\n")
    print("| variant | ns/request/thread | 2-thread scaling | throughput x AddAuthorization | x RwLock | x Mutex | x watch |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        scaling = 2 * single[n] / t[n]
        print(f"| {n} | {t[n]:.0f} | {scaling:.2f}x | {t['add_authorization'] / t[n]:.2f} | "
              f"{t['rwlock_cache'] / t[n]:.2f} | {t['mutex_cache'] / t[n]:.2f} | {t['watch_receiver'] / t[n]:.2f} |")


def replay():
    print("\nreplay (16 MiB in 64 KiB chunks; throughput ratio = bare time / layer time)\n")
    print("| inner service | bare (µs) | AuthLayer with replay (µs) | throughput ratio |")
    print("|---|---|---|---|")
    for group, label in [("replay_16mib_copying_sink", "copies each byte once (a socket write)"),
                         ("replay_16mib_zero_copy_sink", "drops frames untouched (per-chunk cost only)")]:
        bare, ours = median_ns(group, "bare_inner"), median_ns(group, "auth_layer_replay")
        print(f"| {label} | {bare / 1e3:.1f} | {ours / 1e3:.1f} | {bare / ours:.2f} |")


if __name__ == "__main__":
    empty = overhead("overhead_empty")
    overhead("overhead_full")
    contention(empty)
    replay()
