//! The `annals` command-line tool: inspect, check and move an event store
//! (a sled directory or a PostgreSQL schema). `annals --help` lists the
//! commands; README.md, "Operating", shows a session. A service that wants
//! its payloads shown as JSON builds this same binary with its event types:
//! `annals::ops::cli::main_with(PayloadDecoders::new().with::<MyEvent>())`.

fn main() -> std::process::ExitCode {
    annals::ops::cli::main_with(annals::ops::cli::PayloadDecoders::new())
}
