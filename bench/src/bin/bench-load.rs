//! `bench-load`: the benchmark's load generator. Open loop at `--rate` (latency from each
//! request's intended send time), or closed loop without it (maximum throughput). Prints one JSON
//! report on stdout. The `Authorization` header value comes from `BENCH_AUTHORIZATION`, so that the
//! token never shows on a command line. One thread (a current-thread runtime) plus the scheduler
//! thread of the open loop: it shares the generator's core with the upstream.
//! With `--webhook` it posts signed Stripe webhook events (keygate's ingress benchmark,
//! bench/webhooks.sh).
#![allow(clippy::print_stdout)] // The JSON report on stdout is its interface.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Method, Uri};
use keygate_bench::loadgen::{self, LoadSpec, Target};
use keygate_bench::{BenchError, stripe_json, tls};
use rustls_pki_types::ServerName;

#[derive(Debug, Parser)]
#[command(about = "Open-loop HTTP/1.1 load generator for keygate's benchmarks")]
struct Args {
    /// Target URL, e.g. http://127.0.0.1:8080/v1/payment_intents.
    #[arg(long)]
    url: String,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Requests per second (open loop); without it, as fast as the connections go (closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Warm-up before the measured window, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// Measured window, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// HTTP method.
    #[arg(long, default_value = "POST")]
    method: String,
    /// Size of the form body (a PaymentIntent creation padded to this size); 0 for none.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// PEM CA to trust for https:// URLs.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Post Stripe webhook events (distinct ids, about --body-bytes each) signed with the secret
    /// in the environment variable `BENCH_WEBHOOK_SECRET` (never on a command line).
    #[arg(long)]
    webhook: bool,
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(json) => println!("{json}"),
        Err(error) => {
            eprintln!("bench-load: {error}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> Result<String, BenchError> {
    let uri: Uri = args.url.parse().map_err(|e| BenchError::Invalid(format!("--url {:?}: {e}", args.url)))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(BenchError::Invalid("--url must start with http:// or https://".to_owned())),
    };
    let authority = uri.authority().ok_or_else(|| BenchError::Invalid("--url has no host".to_owned()))?;
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addr: SocketAddr = (authority.host(), port)
        .to_socket_addrs()
        .map_err(|source| BenchError::Net { what: format!("resolve {}", authority.host()), source })?
        .next()
        .ok_or_else(|| BenchError::Invalid(format!("{} resolves to no address", authority.host())))?;
    let tls = if https {
        let ca_file =
            args.ca_file.as_ref().ok_or_else(|| BenchError::Invalid("https:// needs --ca-file".to_owned()))?;
        let name = ServerName::try_from(authority.host().to_owned())
            .map_err(|e| BenchError::Invalid(format!("server name {}: {e}", authority.host())))?;
        Some((tls::client_config(ca_file)?, name))
    } else {
        None
    };
    let authorization = match std::env::var("BENCH_AUTHORIZATION") {
        Ok(value) if !value.is_empty() => Some(
            HeaderValue::from_str(&value)
                .map_err(|_| BenchError::Invalid("BENCH_AUTHORIZATION is not a valid header value".to_owned()))?,
        ),
        _ => None,
    };
    let method = Method::from_bytes(args.method.as_bytes())
        .map_err(|_| BenchError::Invalid(format!("--method {:?} is not an HTTP method", args.method)))?;
    let seconds = |name: &str, value: f64| {
        Duration::try_from_secs_f64(value)
            .map_err(|_| BenchError::Invalid(format!("{name} must be a number of seconds ≥ 0")))
    };
    let duration = seconds("--duration-s", args.duration_s)?;
    if duration.is_zero() {
        return Err(BenchError::Invalid("--duration-s must be more than 0".to_owned()));
    }
    let spec = LoadSpec {
        target: Target { addr, tls, host: authority.as_str().to_owned() },
        method,
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        authorization,
        body: if args.body_bytes == 0 {
            Bytes::new()
        } else {
            Bytes::from(stripe_json::payment_intent_form(args.body_bytes))
        },
        connections: args.connections,
        rate: args.rate,
        warmup: seconds("--warmup-s", args.warmup_s)?,
        duration,
        webhook: if args.webhook {
            match std::env::var("BENCH_WEBHOOK_SECRET") {
                Ok(secret) if !secret.is_empty() => Some(loadgen::WebhookLoad::new(&secret)),
                _ => return Err(BenchError::Invalid("--webhook needs BENCH_WEBHOOK_SECRET".to_owned())),
            }
        } else {
            None
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| BenchError::Net { what: "start the runtime".to_owned(), source })?;
    let report = runtime.block_on(loadgen::run(spec))?;
    serde_json::to_string(&report).map_err(|source| BenchError::Json { what: "write the report".to_owned(), source })
}
