//! The `keygate policy …` tools as library functions returning report structs; the proxy's
//! CLI prints them (`Display`) and sets the exit code from them.

mod check;
mod explain;
mod testcases;

pub use check::{CheckReport, check};
pub use explain::{ExplainError, Explanation, explain};
pub use testcases::{CaseResult, TestReport, run_tests};
