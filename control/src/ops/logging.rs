//! Structured logs for the agent and the controller: `--log-level` (a level
//! or a tracing filter; env `OCELOT_LOG`, else `RUST_LOG`, else `info`) and
//! `--log-format text|json` (env `OCELOT_LOG_FORMAT`). JSON is one object
//! per line with `timestamp`, `level`, `target`, `fields` (the message
//! and the event's fields) and the spans, what log collectors index.

/// How log lines look.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The filter to use: the flag (or `OCELOT_LOG`), else `RUST_LOG`, else `info`.
pub fn level(flag: Option<&str>) -> String {
    flag.map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "info".into())
}

/// Install the global subscriber, writing to stderr. An unreadable filter
/// falls back to `info` and says so. Safe to call twice (the second call
/// does nothing), so tests may call it.
pub fn init(flag: Option<&str>, format: LogFormat) {
    let level = level(flag);
    let filter = match tracing_subscriber::EnvFilter::try_new(&level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("invalid --log-level {level:?} ({e}); using info");
            tracing_subscriber::EnvFilter::new("info")
        }
    };
    // Colours only for a person at a terminal, not in a pod's log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().with_current_span(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_rust_log_then_info() {
        assert_eq!(level(Some("debug")), "debug");
        // RUST_LOG is read only when no flag is given; whichever value the
        // environment holds, the fallback is never empty.
        assert!(!level(None).is_empty());
    }
}
