//! The CNI plugin `ocelot-cni` and the protocol it speaks with the agent.
//!
//! No async runtime: the plugin is executed once per pod, on the critical
//! path of pod start-up, and exits in milliseconds.
//!
//! - [`proto`]: the request/response types of the agent's CNI socket.
//! - [`env`]: the `CNI_*` environment variables.
//! - [`config`]: the plugin configuration on stdin.
//! - [`version`]: supported CNI versions and result conversions.
//! - [`client`]: the agent socket, with a deadline.
//! - [`error`]: the CNI error result and codes.
//! - [`plugin`]: one call, from environment and stdin to stdout and exit code.

pub mod client;
pub mod config;
pub mod env;
pub mod error;
pub mod plugin;
pub mod proto;
pub mod version;

use std::io::{IsTerminal, Write};

/// The whole binary: runs one call on the real environment and stdio and
/// returns the exit code. A panic (a bug: bad input never panics) still
/// yields a CNI error on stdout.
pub fn main_with_std() -> i32 {
    let outcome = std::panic::catch_unwind(|| {
        let stdin = std::io::stdin();
        let is_terminal = stdin.is_terminal();
        plugin::run(&|name| std::env::var_os(name), &mut stdin.lock(), is_terminal)
    })
    .unwrap_or_else(|_| plugin::Outcome {
        stdout: error::CniError::new(error::code::INTERNAL, "ocelot-cni: internal error (panic)")
            .to_json(version::CURRENT.as_str())
            + "\n",
        stderr: String::new(),
        exit_code: 1,
    });
    let _ = std::io::stderr().write_all(outcome.stderr.as_bytes());
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(outcome.stdout.as_bytes());
    let _ = stdout.flush();
    outcome.exit_code
}
