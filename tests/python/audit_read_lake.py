"""Reads a keygate audit lake as a compliance team would, with DuckDB and pyarrow, and checks it.

Usage: audit_read_lake.py EXPECTATIONS_JSON

EXPECTATIONS_JSON names the lake (a folder, or s3://bucket/prefix with an endpoint), the table
(`audit` by default, or `webhooks`), the expected rows (event_id -> plaintext columns), canary
strings that must not appear, and optionally `group_by` (columns DuckDB counts by; default
service and outcome) and `null_payload` (event ids whose payload must be null: webhook rows
recorded without a body). Both pyarrow and
DuckDB must see exactly the expected rows with exactly those column values. Prints one JSON line
with what was found (row counts, files and their row groups, the KEK ids in the files' footers,
DuckDB's counts by service and outcome); exits 1 with a message on the first mismatch.
"""
import json
import os
import sys
import tempfile

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def fail(msg):
    print(f"audit_read_lake: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    with open(sys.argv[1]) as f:
        exp = json.load(f)
    lake = exp["lake"]
    expected = exp["rows"]  # event_id -> {column: value}
    canaries = [c.encode() for c in exp["canaries"]]
    tname = exp.get("table", "audit")
    group_by = exp.get("group_by", ["service", "outcome"])
    null_payload = set(exp.get("null_payload", []))

    if lake.startswith("s3://"):
        s3 = exp["s3"]
        fs = pafs.S3FileSystem(
            access_key=s3["access_key"], secret_key=s3["secret_key"], region=s3["region"],
            endpoint_override=s3["endpoint"], scheme="http",
        )
        root = lake[len("s3://"):].rstrip("/") + "/" + tname
    else:
        fs = pafs.LocalFileSystem()
        root = lake.rstrip("/") + "/" + tname

    # pyarrow: Hive partitions, every row, every file's raw bytes.
    dataset = ds.dataset(root, format="parquet", partitioning="hive", filesystem=fs)
    table = dataset.to_table()
    if table.num_rows != len(expected):
        fail(f"pyarrow sees {table.num_rows} rows, expected {len(expected)}")
    for col in ("dt", "hour", "event_id", "writer_id", "seq", "payload", "hash", "prev_hash"):
        if col not in table.column_names:
            fail(f"column {col} missing from {table.column_names}")
    rows = table.to_pylist()
    seen = set()
    for r in rows:
        eid = r["event_id"]
        if eid in seen:
            fail(f"duplicate row {eid}")
        seen.add(eid)
        want = expected.get(eid)
        if want is None:
            fail(f"unexpected row {eid}")
        for k, v in want.items():
            if r[k] != v:
                fail(f"row {eid}: {k} = {r[k]!r}, expected {v!r}")
        p = r["payload"]
        if eid in null_payload:
            if p is not None:
                fail(f"row {eid}: payload should be null")
            p = b"\x01"
        elif p is None:
            fail(f"row {eid}: payload is null")
        # Encrypted: version byte, nonce, ciphertext. No zstd frame, no JSON, no request line.
        if p[0] != 1 or b"\x28\xb5\x2f\xfd" in p or b"POST /v1" in p or b'"request"' in p or b'"event"' in p:
            fail(f"row {eid}: payload is not opaque ciphertext")
        if len(r["hash"]) != 32 or len(r["prev_hash"]) != 32:
            fail(f"row {eid}: hashes are not 32 bytes")
    kek_ids = set()
    row_groups = []
    mirror = tempfile.TemporaryDirectory()
    for info in dataset.files:
        with fs.open_input_file(info) as f:
            data = f.read()
        for c in canaries:
            if c in data:
                fail(f"canary {c!r} found in {info}")
        parquet_meta = pq.read_metadata(pa.BufferReader(data))
        row_groups.append(parquet_meta.num_row_groups)
        footer = parquet_meta.metadata or {}
        kek_ids.add(footer.get(b"keygate.kek_id", b"").decode())
        # The exact bytes of the object, for DuckDB below (same relative layout).
        local = os.path.join(mirror.name, tname, os.path.relpath(info, root))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(data)

    result = {
        "pyarrow_rows": table.num_rows, "files": len(dataset.files), "kek_ids": sorted(kek_ids),
        "row_groups": row_groups,
    }

    # DuckDB, with its own Parquet reader. A local lake is read in place; an S3 lake through the
    # byte-for-byte copies of its objects made above (DuckDB reads s3:// only with its httpfs
    # extension, which it downloads from the internet at run time).
    import duckdb

    con = duckdb.connect()
    glob = (root if not lake.startswith("s3://") else os.path.join(mirror.name, tname)) + "/*/*/*.parquet"
    source = f"read_parquet('{glob}', hive_partitioning = true)"
    n = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
    if n != len(expected):
        fail(f"DuckDB sees {n} rows, expected {len(expected)}")
    columns = sorted({k for want in expected.values() for k in want})
    if columns:
        cursor = con.execute("SELECT event_id, " + ", ".join(f'"{c}"' for c in columns) + f" FROM {source}")
        for row in cursor.fetchall():
            want = expected.get(row[0])
            if want is None:
                fail(f"DuckDB: unexpected row {row[0]}")
            got = dict(zip(columns, row[1:]))
            for k, v in want.items():
                if got[k] != v:
                    fail(f"DuckDB: row {row[0]}: {k} = {got[k]!r}, expected {v!r}")
    keys = ", ".join(f'"{c}"' for c in group_by)
    by_service = con.execute(f"SELECT {keys}, count(*) FROM {source} GROUP BY ALL ORDER BY ALL").fetchall()
    dts = con.execute(f"SELECT DISTINCT dt FROM {source}").fetchall()
    result["duckdb_rows"] = n
    result["duckdb_by_service"] = [list(map(str, row)) for row in by_service]
    result["dt"] = sorted(str(d[0]) for d in dts)
    mirror.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
