//! `beckon`: the one binary. Argument parsing and wiring only; the work lives in the crates.
#![forbid(unsafe_code)]

mod broker;
mod up;
mod wake;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Beckon: a self-hostable push-notification service for fleets of endpoint agents.
#[derive(Debug, Parser)]
#[command(name = "beckon", version, about, long_about = None)]
struct Cli {
    /// Log line format (level filter from RUST_LOG, default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the push service: an MQTT 3.1.1 and 5.0 broker over TLS.
    Broker(broker::BrokerArgs),
    /// Broker and console in one process on ./beckon-data, on loopback: nothing to set up.
    Up(up::UpArgs),
    /// The endpoint agent: keeps the push connection and acts on wake-up calls.
    Agent {
        #[command(subcommand)]
        command: beckon_agent::AgentCommand,
    },
    /// The management console: registry, wake-up calls, Wake-on-LAN, HTTP API.
    Console(Box<beckon_console::ConsoleCommandLine>),
    /// Check every network path an agent would use to reach the broker, and name the fix.
    Doctor(beckon_doctor::DoctorArgs),
    /// Make a wake-up call through the console's API, optionally waiting for each agent.
    Wake(wake::WakeArgs),
    /// Load generator: simulated agent fleets against any MQTT broker.
    Bench {
        #[command(subcommand)]
        command: beckon_bench::BenchCommand,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Broker(args) => broker::main(args),
        Command::Up(args) => up::main(args),
        Command::Agent { command } => beckon_agent::run(command),
        Command::Console(args) => beckon_console::main(*args),
        Command::Doctor(args) => return report(beckon_doctor::run(args)),
        Command::Wake(args) => return wake::main(args),
        Command::Bench { command } => beckon_bench::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The exit code a command chose, or failure with its error printed.
fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {}", error_chain(&e));
        ExitCode::from(2)
    })
}

/// The error and its causes, each cause only when its text is not already in the message
/// (library errors often include their source in their own text).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}
