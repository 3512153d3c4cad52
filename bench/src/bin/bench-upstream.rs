//! `bench-upstream`: the fake Stripe upstream of the benchmarks. Prints `listening <address>` on
//! its first stdout line, then serves until killed. One thread (a current-thread runtime): it
//! shares the generator's core with the load generator and should cost it as little as possible.
//!
//! The key it requires (`Authorization: Bearer <key>`) comes from `BENCH_UPSTREAM_KEY`, so that it
//! never shows on a command line.
#![allow(clippy::print_stdout)] // Its address on stdout is its interface.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use keygate_bench::{BenchError, tls, upstream};

#[derive(Debug, Parser)]
#[command(about = "Fake Stripe upstream for keygate's benchmarks")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Serve TLS with a fresh certificate for localhost and 127.0.0.1 (needs --ca-out).
    #[arg(long, requires = "ca_out")]
    tls: bool,
    /// Where to write the PEM of the CA that signed the TLS certificate.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Offer only HTTP/1.1 over TLS (by default ALPN offers h2 and http/1.1).
    #[arg(long)]
    http1_only: bool,
    /// Fixed delay before each answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn main() {
    let args = Args::parse();
    if let Err(error) = run(args) {
        eprintln!("bench-upstream: {error}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), BenchError> {
    let tls = match (args.tls, &args.ca_out) {
        (true, Some(ca_out)) => {
            let identity = tls::generate_server_identity()?;
            std::fs::write(ca_out, &identity.ca_pem).map_err(|e| BenchError::io("write the CA", ca_out, e))?;
            let alpn: &[&str] = if args.http1_only { &["http/1.1"] } else { &["h2", "http/1.1"] };
            Some(tls::server_config(&identity, alpn)?)
        }
        _ => None,
    };
    let options = upstream::UpstreamOptions {
        delay: Duration::from_millis(args.delay_ms),
        require_key: std::env::var("BENCH_UPSTREAM_KEY").ok().filter(|k| !k.is_empty()),
        tls,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| BenchError::Net { what: "start the runtime".to_owned(), source })?;
    runtime.block_on(async move {
        let (listener, address) = upstream::bind(args.listen).await?;
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "listening {address}");
        let _ = stdout.flush();
        upstream::serve(listener, options).await
    })
}
