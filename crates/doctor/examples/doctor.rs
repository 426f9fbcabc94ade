//! `beckon doctor` without the rest of the binary, for trying the checks by hand:
//!
//! ```text
//! cargo run -p beckon-doctor --example doctor -- --broker broker.example --ca ca.pem
//! ```

use std::process::ExitCode;

use clap::Parser;

/// Checks every path an agent would use to reach the broker.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    doctor: beckon_doctor::DoctorArgs,
}

fn main() -> ExitCode {
    match beckon_doctor::run(Cli::parse().doctor) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("beckon doctor: {e:#}");
            ExitCode::from(2)
        }
    }
}
