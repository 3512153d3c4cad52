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
