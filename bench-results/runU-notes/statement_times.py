#!/usr/bin/env python3
"""Executor time per allocation of the cycle's statements, from the
pg_stat_statements.txt each run of run U saved (calls|exec ms|plan ms|rows|query).

Usage: statement_times.py bench-results/runU-pg-*  (one line per run)
Times are wall-clock inside the executor: on two busy cores they include
waiting for a CPU, so compare them within a run, not across machines.
"""
import sys
from pathlib import Path

KINDS = {
    "Allocate statement": "WITH account AS",
    "bare claim": "UPDATE mandelboxes SET state = $6, session_id = $4",
    "disconnect batch": "WITH input AS ( SELECT * FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY",
    "recycle batch": "WITH input AS ( SELECT * FROM unnest($1::uuid[], $2::text[], $4::uuid[]",
}


def main() -> None:
    print("| run | Allocate stmt ms/call | bare claim ms/call | disconnect ms/row | recycle ms/row | Allocate ÷ claim | cycle ÷ claim |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in sys.argv[1:]:
        found = {}
        for line in (Path(run) / "pg_stat_statements.txt").read_text().splitlines():
            calls, exec_ms, _plan_ms, rows, query = line.split("|", 4)
            for kind, prefix in KINDS.items():
                if query.startswith(prefix) and kind not in found:
                    found[kind] = (int(calls), float(exec_ms), int(rows))
        alloc = found["Allocate statement"][1] / found["Allocate statement"][0]
        claim = found["bare claim"][1] / found["bare claim"][0]
        disconnect = found["disconnect batch"][1] / max(found["disconnect batch"][2], 1)
        recycle = found["recycle batch"][1] / max(found["recycle batch"][2], 1)
        cycle = alloc + disconnect + recycle
        print(
            f"| {Path(run).name} | {alloc:.3f} | {claim:.3f} | {disconnect:.3f} | {recycle:.3f} "
            f"| {alloc / claim:.2f}× | {cycle / claim:.2f}× |"
        )


if __name__ == "__main__":
    main()
