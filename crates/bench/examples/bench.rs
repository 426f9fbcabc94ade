//! `beckon bench` without the rest of `beckon`: `cargo run -p beckon-bench --example bench --
//! bench fleet ...`. Worker processes re-run this same program as `bench worker`, exactly as
//! they re-run `beckon` once the subcommand is wired there.

fn main() -> anyhow::Result<()> {
    beckon_bench::run_standalone()
}
