//! Logging set-up shared by Ocelot's binaries.

/// Log to stderr with `tracing`; `level` is a level name or a full filter
/// (`info`, `ocelot_dataplane=debug,warn`). An unreadable filter falls back
/// to `info` and says so.
pub fn init(level: &str) {
    let filter = match tracing_subscriber::EnvFilter::try_new(level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("invalid --log-level {level:?} ({e}); using info");
            tracing_subscriber::EnvFilter::new("info")
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
