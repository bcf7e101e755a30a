//! `outbox`: the admin command of the outbox and inbox tables.

fn main() -> std::process::ExitCode {
    outbox_cli::main()
}
