//! localstripe, the stateful fake Stripe server, started on a free port.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{ChildGuard, free_port, tool, wait_for_tcp};

/// A running localstripe.
#[derive(Debug)]
pub struct Localstripe {
    _child: ChildGuard,
    pub addr: SocketAddr,
}

impl Localstripe {
    /// Starts localstripe and waits until it accepts connections.
    pub fn start() -> Localstripe {
        let port = free_port();
        let mut command = Command::new(tool("localstripe"));
        // --from-scratch: localstripe otherwise reloads state from a pickle it shares with every
        // other instance on the machine (/tmp/localstripe.pickle); each test wants its own.
        command.arg("--port").arg(port.to_string()).arg("--from-scratch").stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = ChildGuard::spawn("localstripe", &mut command);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for_tcp(addr, Duration::from_secs(30), "localstripe");
        child.assert_running();
        Localstripe { _child: child, addr }
    }

    /// The base URL to configure as keygate's api upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
