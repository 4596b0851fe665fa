#!/usr/bin/env python3
"""Run AA's table: per report directory and client count, Allocate's rate and latency beside the server's
phases (lone claims, the claim batch, the assignment). Usage: phases_table.py DIR..."""
import json, sys

print("| run | clients | Allocate/s | p50 / p99 (ms) | claims written alone | claim p50 / p99 (ms) | batch write mean (ms) | claims per batch | assign p50 / p99 (ms) | handler p50 / p99 (ms) | CPU per allocation, ms: server / database / loadgen |")
print("|---|---:|---:|---|---:|---|---:|---:|---|---|---|")
for d in sys.argv[1:]:
    report = json.load(open(f"{d}/report.json"))
    for backend in report["backends"]:
        for p in backend["allocation"]:
            ph = {x["phase"]: x for x in (p.get("server_phases") or {}).get("phases", [])}
            per = lambda cores: cores / p["allocations_per_s"] * 1000
            alone = ph.get("claim_alone", {}).get("count", 0)
            claims = ph.get("claim", {}).get("count", 0) or 1
            c = p["cpu"]
            print(f"| {d.rstrip('/').split('/')[-1]} | {p['clients']} | {p['allocations_per_s']:.0f} | "
                  f"{p['allocate']['p50_ms']:.2f} / {p['allocate']['p99_ms']:.2f} | {alone} ({100*alone/claims:.1f}%) | "
                  f"{ph['claim']['p50_ms']:.2f} / {ph['claim']['p99_ms']:.2f} | {ph['claim batch']['mean_ms']:.2f} | "
                  f"{(p['server_phases'] or {}).get('claims_per_batch', 0):.1f} | "
                  f"{ph['assign']['p50_ms']:.2f} / {ph['assign']['p99_ms']:.2f} | {ph['handler']['p50_ms']:.2f} / {ph['handler']['p99_ms']:.2f} | "
                  f"{per(c['server_cores']):.3f} / {per(c['database_cores']):.3f} / {per(c['loadgen_cores']):.3f} |")
