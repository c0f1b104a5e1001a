"""The per-rank report of a finished load, as a table (``meshload load``).

Runs on the driver.
"""

from __future__ import annotations

from planning.summary import human_bytes, table


def report_table(loaded) -> str:
    rows = []
    for r in loaded.report:
        rows.append(
            [
                str(r.rank),
                str(r.node),
                r.node_ip or r.node_id[:8],
                str(r.stage),
                str(r.tp_rank),
                f"{r.seconds:.2f}",
                human_bytes(r.bytes_read),
                human_bytes(r.param_bytes),
                f"{r.bytes_read / r.param_bytes:.3f}" if r.param_bytes else "-",
                human_bytes(r.bytes_fetched),
                human_bytes(r.peak_rss_bytes),
            ]
        )
    headers = ["rank", "node", "node ip", "stage", "tp", "seconds", "read", "params", "read/params", "fetched", "peak rss"]
    return table(headers, rows)
