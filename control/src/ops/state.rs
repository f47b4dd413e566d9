//! What the agent tells the operations endpoints: a few flags and counters
//! it updates as it works, read by `/livez`, `/readyz`, `/metrics` and
//! `/status`. Cheap to update (atomics, short locks); the agent never waits
//! on a scrape.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the policy calculation time histogram: from
/// 100 µs (one pod's change) to 5 s (a full recalculation of a large
/// cluster).
pub const POLICY_CALC_BUCKETS: [f64; 10] =
    [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A cumulative histogram, as Prometheus reads one.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Histogram {
    /// Observations at or below each bound of [`POLICY_CALC_BUCKETS`].
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: f64,
    /// The most recent observation, seconds.
    pub last: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.buckets.len() != POLICY_CALC_BUCKETS.len() {
            self.buckets = vec![0; POLICY_CALC_BUCKETS.len()];
        }
        for (i, b) in POLICY_CALC_BUCKETS.iter().enumerate() {
            if v <= *b {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
        self.last = v;
    }
}

/// The agent's health and activity, shared with the HTTP server.
#[derive(Debug)]
pub struct OpsState {
    started: Instant,
    /// Milliseconds since `started` of the last turn of the agent's loop
    /// (`u64::MAX`: never).
    last_tick_ms: AtomicU64,
    datastore_synced: AtomicBool,
    /// Why the datastore is not current (an API server error), if it is not.
    datastore_error: Mutex<Option<String>>,
    dataplane_connected: AtomicBool,
    endpoints_synced: AtomicBool,
    sync_errors: Mutex<BTreeMap<&'static str, u64>>,
    policy_calc: Mutex<Histogram>,
    /// How long the loop may stand still before `/livez` fails.
    pub liveness_timeout: Duration,
}

impl Default for OpsState {
    fn default() -> Self {
        OpsState::new(Duration::from_secs(30))
    }
}

impl OpsState {
    pub fn new(liveness_timeout: Duration) -> OpsState {
        OpsState {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(u64::MAX),
            datastore_synced: AtomicBool::new(false),
            datastore_error: Mutex::new(None),
            dataplane_connected: AtomicBool::new(false),
            endpoints_synced: AtomicBool::new(false),
            sync_errors: Mutex::new(BTreeMap::new()),
            policy_calc: Mutex::new(Histogram::default()),
            liveness_timeout,
        }
    }

    /// The agent's loop turned once.
    pub fn tick(&self) {
        self.last_tick_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The datastore has delivered a complete view (the directory was read,
    /// or the Kubernetes watchers listed everything once).
    pub fn set_datastore_synced(&self, synced: bool) {
        self.datastore_synced.store(synced, Ordering::Relaxed);
    }

    /// The datastore's state as the agent's loop sees it: listed in full
    /// once, and the error keeping it from being current, if any.
    pub fn set_datastore(&self, synced: bool, error: Option<String>) {
        self.set_datastore_synced(synced);
        *self.datastore_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    pub fn datastore_error(&self) -> Option<String> {
        self.datastore_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The dataplane connection is up (and took the full endpoint `sync`),
    /// or it is down.
    pub fn set_dataplane(&self, connected: bool) {
        self.dataplane_connected.store(connected, Ordering::Relaxed);
        self.endpoints_synced.store(connected, Ordering::Relaxed);
    }

    /// A step of the agent's work failed (`what`: `policy`, `overlay`,
    /// `ipam`, `dataplane`, ...); it will be retried.
    pub fn sync_error(&self, what: &'static str) {
        *self.sync_errors.lock().unwrap_or_else(|e| e.into_inner()).entry(what).or_default() += 1;
    }

    /// One policy calculation took `d`.
    pub fn policy_calculated(&self, d: Duration) {
        self.policy_calc.lock().unwrap_or_else(|e| e.into_inner()).observe(d.as_secs_f64());
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time since the loop last turned; `None` before its first turn.
    pub fn since_last_tick(&self) -> Option<Duration> {
        let t = self.last_tick_ms.load(Ordering::Relaxed);
        (t != u64::MAX).then(|| self.started.elapsed().saturating_sub(Duration::from_millis(t)))
    }

    /// `/livez`: the loop turned recently (or the agent is young enough
    /// that it may not have yet).
    pub fn liveness(&self) -> Result<(), String> {
        match self.since_last_tick() {
            Some(d) if d > self.liveness_timeout => Err(format!(
                "the agent's loop has not turned for {:.1}s (limit {}s)",
                d.as_secs_f64(),
                self.liveness_timeout.as_secs()
            )),
            None if self.uptime() > self.liveness_timeout => {
                Err("the agent's loop never started".into())
            }
            _ => Ok(()),
        }
    }

    /// `/readyz`: every reason the node is not ready to run pods yet.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if let Err(e) = self.liveness() {
            why.push(e);
        }
        if !self.datastore_synced.load(Ordering::Relaxed) {
            match self.datastore_error() {
                Some(e) => why.push(format!("datastore not synced yet: {e}")),
                None => why.push("datastore not synced yet".into()),
            }
        }
        if !self.dataplane_connected.load(Ordering::Relaxed) {
            why.push("dataplane not reachable".into());
        } else if !self.endpoints_synced.load(Ordering::Relaxed) {
            why.push("endpoints not synced to the dataplane".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }

    pub fn flags(&self) -> Flags {
        Flags {
            datastore_synced: self.datastore_synced.load(Ordering::Relaxed),
            dataplane_connected: self.dataplane_connected.load(Ordering::Relaxed),
            endpoints_synced: self.endpoints_synced.load(Ordering::Relaxed),
        }
    }

    pub fn sync_errors(&self) -> BTreeMap<String, u64> {
        self.sync_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    pub fn policy_calc(&self) -> Histogram {
        self.policy_calc.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The readiness inputs, for `/status`.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Flags {
    pub datastore_synced: bool,
    pub dataplane_connected: bool,
    pub endpoints_synced: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_every_missing_piece() {
        let s = OpsState::new(Duration::from_secs(30));
        s.tick();
        let why = s.readiness().unwrap_err();
        assert_eq!(why, vec!["datastore not synced yet", "dataplane not reachable"]);
        s.set_datastore_synced(true);
        s.set_dataplane(true);
        assert_eq!(s.readiness(), Ok(()));
        s.set_dataplane(false);
        assert_eq!(s.readiness().unwrap_err(), vec!["dataplane not reachable"]);
        s.set_datastore(false, Some("pods: 403 Forbidden".into()));
        s.set_dataplane(true);
        assert_eq!(
            s.readiness().unwrap_err(),
            vec!["datastore not synced yet: pods: 403 Forbidden"]
        );
    }

    #[test]
    fn liveness_fails_when_the_loop_stops() {
        let s = OpsState::new(Duration::from_millis(0));
        s.tick();
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.liveness().unwrap_err().contains("has not turned"));
        let young = OpsState::new(Duration::from_secs(30));
        assert_eq!(young.liveness(), Ok(()), "a young agent is alive before its first turn");
    }

    #[test]
    fn histogram_is_cumulative() {
        let s = OpsState::default();
        s.policy_calculated(Duration::from_micros(50));
        s.policy_calculated(Duration::from_millis(3));
        let h = s.policy_calc();
        assert_eq!(h.count, 2);
        assert_eq!(h.buckets[0], 1, "50 µs is under 100 µs");
        assert_eq!(h.buckets[3], 2, "both are under 5 ms");
        assert!((h.last - 0.003).abs() < 1e-9);
        s.sync_error("policy");
        s.sync_error("policy");
        assert_eq!(s.sync_errors()["policy"], 2);
    }
}
