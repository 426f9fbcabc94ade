//! `beckon bench` without the rest of `beckon`: `cargo run -p beckon-bench --example bench --
//! bench fleet ...`. Worker processes re-run this same program as `bench worker`, exactly as
//! they re-run `beckon` once the subcommand is wired there.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "The fleet load generator of beckon, standalone"
)]
struct Cli {
    #[command(subcommand)]
    top: Top,
}

#[derive(clap::Subcommand)]
enum Top {
    /// Load generator.
    #[command(subcommand)]
    Bench(beckon_bench::BenchCommand),
}

fn main() -> anyhow::Result<()> {
    let Cli {
        top: Top::Bench(command),
    } = Cli::parse();
    beckon_bench::run(command)
}
