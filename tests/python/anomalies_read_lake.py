"""Reads the `anomalies` table of a keygate lake with pyarrow and DuckDB, as docs/anomalies.md
shows, and joins each alert to the audit rows it cites.

Usage: anomalies_read_lake.py LAKE_FOLDER

Prints one JSON object: `pyarrow` (the anomalies rows as pyarrow reads them: plaintext columns,
`cited_event_ids` as a list, timestamps as text) and `duckdb_join` (the DuckDB join of
docs/anomalies.md over every mode: alert event id, detector, mode and the cited audit row's
event_id, operation, amount, currency and status).
"""
import json
import sys

import duckdb
import pyarrow.dataset as ds


def main():
    lake = sys.argv[1]
    columns = [
        "event_id", "writer_id", "seq", "raised_at", "service", "detector", "subject", "severity", "mode",
        "window_start", "window_end", "expected_value", "observed_value", "score", "cited_event_ids", "dt",
    ]
    table = ds.dataset(f"{lake}/anomalies", format="parquet", partitioning="hive").to_table(columns=columns)
    rows = [{k: (v if isinstance(v, (str, int, float, list, type(None))) else str(v)) for k, v in r.items()}
            for r in table.to_pylist()]
    con = duckdb.connect()
    join = con.execute(
        f"""
        SELECT n.event_id, n.detector, n.mode, a.event_id, a.operation, a.amount, a.currency, a.status
        FROM read_parquet('{lake}/anomalies/*/*/*.parquet', hive_partitioning = true) n
        JOIN read_parquet('{lake}/audit/*/*/*.parquet', hive_partitioning = true) a
          ON list_contains(n.cited_event_ids, a.event_id)
        ORDER BY n.raised_at
        """
    ).fetchall()
    names = ["alert", "detector", "mode", "event_id", "operation", "amount", "currency", "status"]
    print(json.dumps({"pyarrow": rows, "duckdb_join": [dict(zip(names, r)) for r in join]}))


if __name__ == "__main__":
    main()
