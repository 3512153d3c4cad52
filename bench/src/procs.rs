//! Child processes of the harness (the upstream, keygate, nginx, the load generator): started
//! pinned to a core with `taskset`, stopped with SIGTERM then SIGKILL, never left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::error::BenchError;

/// How long a stopped process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A `Command` for `program`, run under `taskset -c <core>` when a core is given.
pub fn pinned(core: Option<usize>, program: &Path) -> Command {
    match core {
        Some(core) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(core.to_string()).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running child process, stopped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    pid: u32,
    /// Where its output goes, quoted in errors.
    log: PathBuf,
}

impl Proc {
    /// Starts `command` (whose stdio the caller has set up), naming it `name` in messages.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Proc, BenchError> {
        let child = command.spawn().map_err(|source| BenchError::Net {
            what: format!("start {name} ({:?}); is it built and is taskset installed?", command.get_program()),
            source,
        })?;
        Ok(Proc { name: name.to_owned(), pid: child.id(), child: Some(child), log: log.to_path_buf() })
    }

    /// The process id (taskset execs the program, so it is the program's own).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child, for reading its piped output.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// An error, quoting the end of its log, if the process has exited.
    pub fn ensure_running(&mut self) -> Result<(), BenchError> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(BenchError::Process(format!(
                "{} exited unexpectedly ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 30)
            )));
        }
        Ok(())
    }

    /// Stops the process: SIGTERM, then SIGKILL after a grace period. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
