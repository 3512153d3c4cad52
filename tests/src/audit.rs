//! Reading what keygate's audit log left behind: the `auditlog` command, its JSON-lines output,
//! and every byte of a WAL or lake folder (for canary scans).

use std::path::Path;

/// Runs the `auditlog` binary with extra environment; (exit code, stdout, stderr).
pub fn auditlog(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let output = std::process::Command::new(crate::keygate::binary("auditlog"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("cannot run auditlog: {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The rows of `auditlog query --lake LAKE --format jsonl SQL`; panics with auditlog's stderr if
/// the query fails.
pub fn query_lake(lake: &Path, sql: &str) -> Vec<serde_json::Value> {
    let lake = lake.display().to_string();
    let (code, out, err) = auditlog(&["query", "--lake", &lake, "--format", "jsonl", sql], &[]);
    assert_eq!(code, 0, "auditlog query {sql:?}: {err}");
    jsonl(&out)
}

/// The JSON values of a JSON-lines text (blank lines skipped); panics on a line that is not JSON.
pub fn jsonl(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Every file under `dir` with its bytes, sorted by path.
pub fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
    out.sort();
    out
}
