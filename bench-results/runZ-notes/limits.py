"""Run Z's second table: the bare claim and the store cycle per run directory, at 16 and 64 clients (from
report.json's limit points)."""
import json
import sys

print("| run | bare claims/s 16 / 64 | store cycles/s 16 / 64 | PENDING answers at 16 / 64 |")
print("|---|---|---|---|")
for path in sys.argv[1:]:
    backend = json.load(open(f"{path}/report.json"))["backends"][0]

    def rate(points, clients):
        return next((p["per_s"] for p in points if p["clients"] == clients), float("nan"))

    def pending(clients):
        row = next(a for a in backend["allocation"] if a["clients"] == clients)
        return row.get("errors", {}).get("PENDING", 0)

    claims = backend.get("bare_claim") or backend.get("claim") or []
    print(
        f"| {path.rstrip('/').split('/')[-1]} "
        f"| {rate(claims, 16):,.0f} / {rate(claims, 64):,.0f} "
        f"| {rate(backend['store_cycle'], 16):,.0f} / {rate(backend['store_cycle'], 64):,.0f} "
        f"| {pending(16)} / {pending(64)} |"
    )
