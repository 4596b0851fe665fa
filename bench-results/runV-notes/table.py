"""Run V's table: one row per run directory given, from its report.json."""
import json
import sys


def point(rows, clients):
    return next(row for row in rows if row["clients"] == clients)


for path in sys.argv[1:]:
    backend = json.load(open(f"{path}/report.json"))["backends"][0]
    cells = []
    for clients in (16, 64):
        alloc = point(backend["allocation"], clients)
        claim = point(backend["bare_claim"], clients)
        cycle = point(backend["store_cycle"], clients)
        ratio = point(backend["ratios"], clients)
        cells.append((alloc, claim, cycle, ratio))
    (a16, c16, s16, r16), (a64, c64, s64, r64) = cells
    print(
        f"| {path.rstrip('/').split('/')[-1]} "
        f"| {a16['allocations_per_s']:,.0f} / {a64['allocations_per_s']:,.0f} "
        f"| {a16['allocate']['p50_ms']:.2f} / {a16['allocate']['p99_ms']:.2f} "
        f"| {a64['allocate']['p50_ms']:.2f} / {a64['allocate']['p99_ms']:.2f} "
        f"| {c16['per_s']:,.0f} / {c64['per_s']:,.0f} "
        f"| {s16['per_s']:,.0f} / {s64['per_s']:,.0f} "
        f"| {r16['cost_per_allocation']:.2f}× / {r64['cost_per_allocation']:.2f}× |"
    )
