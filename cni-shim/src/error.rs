//! The CNI error result (spec §5 "Error") and the well-known codes.

use serde::Serialize;
use std::fmt;

/// The spec's well-known error codes (checklist ERR-03), plus libcni's
/// `ErrInvalidNetNS` (8) and `ErrInternal` (999).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (reading stdin).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// libcni: `CNI_NETNS` is the plugin's own network namespace.
    pub const INVALID_NETNS: u32 = 8;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: cannot serve ADD, and existing containers may have limited
    /// connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// libcni: internal error (here: the agent broke the protocol).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: printed on stdout as
/// `{"cniVersion", "code", "msg", "details"?}` with a non-zero exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    /// The JSON document for stdout. `details` is left out when empty, as
    /// libcni does.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let out = Out { cni_version, code: self.code, msg: &self.msg, details: &self.details };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_string_pretty(&out).unwrap_or_default()
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_matches_spec_example() {
        // [ERR-01] the spec's own example (cni_result_vectors.json, SPEC.md block #3).
        let e = CniError::with_details(
            code::INVALID_CONFIG,
            "Invalid Configuration",
            "Network 192.168.0.0/31 too small to allocate from.",
        );
        let got: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        let want = serde_json::json!({
            "cniVersion": "1.1.0",
            "code": 7,
            "msg": "Invalid Configuration",
            "details": "Network 192.168.0.0/31 too small to allocate from."
        });
        assert_eq!(got, want);
    }

    #[test]
    fn empty_details_are_left_out() {
        let e = CniError::new(code::INVALID_ENV, "x");
        let got: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(got, serde_json::json!({"cniVersion": "1.0.0", "code": 4, "msg": "x"}));
    }
}
