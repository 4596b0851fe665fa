"""Run W's table: one row per run directory given, from its report.json: allocations/s, Allocate p50/p99,
the cost ratio, and (where the report has it) CPU per allocation by process, at 16 and 64 clients."""
import json
import sys


def point(rows, clients):
    return next(row for row in rows if row["clients"] == clients)


def cpu_ms(alloc):
    rate = alloc["allocations_per_s"]
    cpu = alloc.get("cpu")
    if cpu is None:
        return f"{alloc['server_cpu_cores'] * 1000 / rate:.3f} / – / –"
    return " / ".join(f"{cpu[k] * 1000 / rate:.3f}" for k in ("server_cores", "database_cores", "loadgen_cores"))


print("| run | Allocate/s 16 / 64 | p50 / p99 at 16 (ms) | p50 / p99 at 64 (ms) | cost ratio 16 / 64 "
      "| CPU per allocation at 16, ms: server / database / loadgen | same at 64 |")
print("|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    backend = json.load(open(f"{path}/report.json"))["backends"][0]
    a16, a64 = point(backend["allocation"], 16), point(backend["allocation"], 64)
    r16, r64 = point(backend["ratios"], 16), point(backend["ratios"], 64)
    print(
        f"| {path.rstrip('/').split('/')[-1]} "
        f"| {a16['allocations_per_s']:,.0f} / {a64['allocations_per_s']:,.0f} "
        f"| {a16['allocate']['p50_ms']:.2f} / {a16['allocate']['p99_ms']:.2f} "
        f"| {a64['allocate']['p50_ms']:.2f} / {a64['allocate']['p99_ms']:.2f} "
        f"| {r16['cost_per_allocation']:.2f}× / {r64['cost_per_allocation']:.2f}× "
        f"| {cpu_ms(a16)} | {cpu_ms(a64)} |"
    )
