//! The `keygate` command: thin argument parsing over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "keygate", version, about = "A zero-trust egress proxy for the Stripe API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy. Without --config, runs the quick start (key from STRIPE_SECRET_KEY).
    Serve {
        /// The YAML configuration file (docs/configuration.md).
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Quick start only: where the token and local data live.
        #[arg(long, env = "KEYGATE_DATA_DIR", default_value = "./keygate-data")]
        data_dir: PathBuf,
        /// Quick start only: accept a live-mode STRIPE_SECRET_KEY.
        #[arg(long)]
        allow_live_key: bool,
    },
    /// Service tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Policy files: validate, explain a decision, run test cases.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Close the audit lake's `outcome = unknown` rows: link the client's own retry, re-send with
    /// the same Idempotency-Key, or name what needs a person (docs/operations.md). A dry run
    /// unless --apply. Exit 1 when some row needs review.
    Reconcile {
        /// keygate's configuration file (required with --apply).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The lake (default: audit.lake of --config).
        #[arg(long)]
        lake: Option<String>,
        /// Secret reference of the key-encryption key (default: audit.kek of --config).
        #[arg(long = "kek")]
        kek: Vec<String>,
        /// Start of the period: a duration back from now, a date or an RFC 3339 time.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Act: write the resolution rows and re-send (otherwise only say what would be done).
        #[arg(long)]
        apply: bool,
        /// `table` (one line per unknown row) or `jsonl`.
        #[arg(long, value_enum, default_value_t = ReplayFormat::Table)]
        format: ReplayFormat,
    },
    /// Webhook dead letters, re-drive and replay, through a running keygate's admin listener
    /// (token in KEYGATE_WEBHOOK_ADMIN_TOKEN).
    Webhooks {
        /// The admin listener.
        #[arg(long, env = "KEYGATE_ADMIN_URL", default_value = "http://127.0.0.1:9090", global = true)]
        admin: String,
        #[command(subcommand)]
        command: WebhooksCommand,
    },
}

#[derive(Debug, Subcommand)]
enum WebhooksCommand {
    /// List dead-lettered deliveries.
    DeadLetters {
        /// Only this destination's.
        #[arg(long)]
        destination: Option<String>,
    },
    /// Queue dead letters for delivery again.
    Redrive {
        /// Only this destination's.
        #[arg(long)]
        destination: Option<String>,
        /// Only these keygate event ids (repeatable).
        #[arg(long = "event-id")]
        event_ids: Vec<String>,
    },
    /// Deliver stored events to one destination again.
    Replay {
        #[arg(long)]
        destination: String,
        /// Received at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Received before this time (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Event type filter (`invoice.*`, `charge.dispute.created`).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// One Stripe event id.
        #[arg(long)]
        stripe_event_id: Option<String>,
        /// One keygate event id.
        #[arg(long)]
        event_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate and lint a policy folder; non-zero exit on errors.
    Check {
        /// The policy folder.
        dir: PathBuf,
    },
    /// Show the decision, and the rule, for a described request.
    Explain {
        /// The policy folder.
        #[arg(long)]
        policies: PathBuf,
        /// The service whose policy decides.
        #[arg(long)]
        service: String,
        /// `Stripe-Account`, `Stripe-Context`, `Idempotency-Key` or `Content-Type` header, as NAME=VALUE.
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// Decide as if the service's key were a live-mode key.
        #[arg(long)]
        live: bool,
        /// The request, e.g. 'POST /v1/payment_intents'.
        request: String,
        /// Parameters in Stripe's bracket notation, e.g. amount=5000 currency=usd metadata[order]=42.
        params: Vec<String>,
    },
    /// Run the test cases written next to the policies (`<service>.tests.yaml`).
    Test {
        /// The policy folder.
        dir: PathBuf,
    },
    /// Re-decide every request the audit lake recorded in a period under a candidate policy
    /// folder, in arrival order, and report what would change (docs/policies.md).
    Replay {
        /// The candidate policy folder.
        #[arg(long)]
        policies: PathBuf,
        /// The lake: file:///path, a path, or s3://bucket/prefix.
        #[arg(long)]
        lake: String,
        /// Secret reference of the key-encryption key (repeat for rotated keys); without it only
        /// the plaintext columns are replayed.
        #[arg(long = "kek")]
        kek: Vec<String>,
        /// Start of the period: a duration back from now (7d, 24h), a date or an RFC 3339 time.
        #[arg(long, default_value = "7d")]
        since: String,
        /// Only this service (repeatable).
        #[arg(long = "service")]
        services: Vec<String>,
        /// `table` (summary per service, operation and rule) or `jsonl` (one line per changed
        /// decision).
        #[arg(long, value_enum, default_value_t = ReplayFormat::Table)]
        format: ReplayFormat,
        /// Exit 1 when the candidate would deny something production let through
        /// (`newly-denied`) or change any decision (`any-change`).
        #[arg(long, value_enum)]
        fail_on: Option<FailOn>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReplayFormat {
    Table,
    Jsonl,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FailOn {
    NewlyDenied,
    AnyChange,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint a token for a service: prints the token once, and the hash for its policy file.
    New {
        #[arg(long)]
        service: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (with KEYGATE_… overrides) and its policy folder.
    Check {
        /// The YAML configuration file.
        file: PathBuf,
    },
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    // A panic's message may quote input (a value a parser choked on), so only its location is
    // printed; the request it happened in is answered 500 and recorded (proxy/src/pipeline.rs).
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map_or_else(|| "unknown location".to_owned(), |l| l.to_string());
        // Never `eprintln!` here: with stderr gone it would panic inside the hook and abort.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("keygate: a thread panicked at {location} (message withheld: it may quote request data)\n")
                .as_bytes(),
        );
    }));
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, data_dir, allow_live_key } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("keygate: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let options = keygate::run::ServeOptions { config_file: config, data_dir, allow_live_key };
            match runtime.block_on(keygate::run::serve(options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("keygate: {error}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Token { command: TokenCommand::New { service } } => {
            let minted = keygate::auth::mint_token();
            println!("token: {}", minted.token.expose());
            println!("hash:  {}", minted.hash);
            println!();
            println!("Give the token to service `{service}` as its Stripe API key (it is shown only this once).");
            println!("Put the hash in the service's policy file:\n  token_hashes:\n    - \"{}\"", minted.hash);
            ExitCode::SUCCESS
        }
        Command::Policy { command } => policy_command(command),
        Command::Reconcile { config, lake, kek, since, apply, format } => {
            reconcile(keygate::reconcile::ReconcileOptions { config_file: config, lake, kek, since, apply }, format)
        }
        Command::Webhooks { admin, command } => webhooks_command(&admin, command),
        Command::Config { command: ConfigCommand::Check { file } } => {
            match keygate::config::load(Some(&file), &keygate::config::process_env()) {
                Ok(config) => {
                    if let Some(dir) = &config.policies.dir
                        && let Err(error) = keygate::run::load_policies(dir)
                            .and_then(|set| keygate::gateway::ServiceDirectory::build(&set).map_err(Into::into))
                    {
                        eprintln!("keygate: {error}");
                        return ExitCode::from(2);
                    }
                    println!("{}: configuration OK", file.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("keygate: {error}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn split_pairs(items: &[String], what: &str) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{what} `{item}` is not NAME=VALUE"))
        })
        .collect()
}

#[allow(clippy::print_stdout)]
fn policy_command(command: PolicyCommand) -> ExitCode {
    match command {
        PolicyCommand::Check { dir } => {
            let report = keygate_policies::check(&dir);
            println!("{report}");
            if report.has_errors() { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
        PolicyCommand::Test { dir } => {
            let report = keygate_policies::run_tests(&dir);
            println!("{report}");
            if report.failed() { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
        PolicyCommand::Replay { policies, lake, kek, since, services, format, fail_on } => {
            policy_replay(&policies, &lake, &kek, &since, &services, format, fail_on)
        }
        PolicyCommand::Explain { policies, service, headers, live, request, params } => {
            let set = match keygate::run::load_policies(&policies) {
                Ok(set) => set,
                Err(error) => {
                    eprintln!("keygate: {error}");
                    return ExitCode::from(2);
                }
            };
            let pairs = split_pairs(&params, "parameter").and_then(|p| Ok((p, split_pairs(&headers, "header")?)));
            let (params, headers) = match pairs {
                Ok(pairs) => pairs,
                Err(error) => {
                    eprintln!("keygate: {error}");
                    return ExitCode::from(2);
                }
            };
            match keygate_policies::explain(&set, &service, &request, &params, &headers, live) {
                Ok(explanation) => {
                    println!("{explanation}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("keygate: {error}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

#[allow(clippy::print_stdout)]
fn webhooks_command(admin: &str, command: WebhooksCommand) -> ExitCode {
    use http::Method;
    let (method, path, body) = match command {
        WebhooksCommand::DeadLetters { destination } => {
            let path = match destination {
                Some(name) => format!("/webhooks/dead-letters?destination={name}"),
                None => "/webhooks/dead-letters".to_owned(),
            };
            (Method::GET, path, None)
        }
        WebhooksCommand::Redrive { destination, event_ids } => (
            Method::POST,
            "/webhooks/dead-letters/redrive".to_owned(),
            Some(serde_json::json!({"destination": destination, "event_ids": event_ids})),
        ),
        WebhooksCommand::Replay { destination, from, to, event_type, stripe_event_id, event_id } => {
            let mut body = serde_json::json!({"destination": destination});
            for (key, value) in [
                ("from", from),
                ("to", to),
                ("type", event_type),
                ("stripe_event_id", stripe_event_id),
                ("event_id", event_id),
            ] {
                if let Some(value) = value {
                    body[key] = value.into();
                }
            }
            (Method::POST, "/webhooks/replay".to_owned(), Some(body))
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keygate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(keygate::webhook_cli::call(admin, method, &path, body)) {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("keygate: {error}");
            ExitCode::from(1)
        }
    }
}

/// A progress bar on stderr when it is a terminal (hidden otherwise).
fn progress_bar(what: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})") {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}

#[allow(clippy::print_stdout)]
fn policy_replay(
    policies: &std::path::Path,
    lake: &str,
    kek: &[String],
    since: &str,
    services: &[String],
    format: ReplayFormat,
    fail_on: Option<FailOn>,
) -> ExitCode {
    use keygate_ops::Change;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keygate: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let candidate = keygate_ops::replay::load_candidate(policies)?;
        let since_us = keygate_ops::parse_since(since)?;
        let reader = keygate_ops::LakeReader::open(lake, kek).await?;
        let reading = progress_bar("reading lake files");
        let rows = reader
            .read(since_us, services, |done, total| {
                reading.set_length(total as u64);
                reading.set_position(done as u64);
            })
            .await?;
        reading.finish_and_clear();
        let deciding = progress_bar("replaying requests");
        let report = keygate_ops::replay::replay(candidate, &rows, |done, total| {
            if done % 256 == 0 || done == total {
                deciding.set_length(total as u64);
                deciding.set_position(done as u64);
            }
        });
        deciding.finish_and_clear();
        Ok::<_, keygate_ops::OpsError>(report)
    });
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            eprintln!("keygate: {error}");
            return ExitCode::from(2);
        }
    };
    match format {
        ReplayFormat::Table => print!("{}", report.table()),
        ReplayFormat::Jsonl => print!("{}", report.jsonl()),
    }
    let failed = match fail_on {
        None => false,
        Some(FailOn::NewlyDenied) => report.count(Change::NewlyDenied) > 0,
        Some(FailOn::AnyChange) => report.count(Change::NewlyDenied) + report.count(Change::NewlyAllowed) > 0,
    };
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

#[allow(clippy::print_stdout)]
fn reconcile(options: keygate::reconcile::ReconcileOptions, format: ReplayFormat) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keygate: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let resolutions = match runtime.block_on(keygate::reconcile::run(options)) {
        Ok(resolutions) => resolutions,
        Err(error) => {
            eprintln!("keygate: {error}");
            return ExitCode::from(2);
        }
    };
    for resolution in &resolutions {
        match format {
            ReplayFormat::Table => println!("{}", resolution.line()),
            ReplayFormat::Jsonl => println!("{}", serde_json::to_string(resolution).unwrap_or_default()),
        }
    }
    let review = resolutions
        .iter()
        .filter(|r| matches!(r.item.action, keygate_ops::reconcile::Action::NeedsReview { .. }))
        .count();
    if format == ReplayFormat::Table {
        println!("{} unknown rows, {review} needing review", resolutions.len());
    }
    if review > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
