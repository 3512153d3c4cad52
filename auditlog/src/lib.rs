//! keygate audit log: records, redaction, envelope encryption, write-ahead log, Parquet lake,
//! tamper evidence, verification and SQL query.
