//! Structured logs on stderr: JSON lines (one object per event, fields at the top level) or
//! text (colour only on a terminal).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// `RUST_LOG` overrides the default filter (`info`).
pub fn init(format: LogFormat) {
    init_with(format, "info");
}

/// For the one-shot commands (`check`, `status`, `drain`, `uncordon`): their output is the
/// report on stdout, so logs stay quiet unless asked for with `RUST_LOG`.
pub fn init_cli() {
    init_with(LogFormat::Text, "warn,kube_client=off");
}

fn init_with(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
