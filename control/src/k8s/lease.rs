//! Leader election through a `coordination.k8s.io/v1` Lease, so that one
//! replica of `ocelot controller` acts at a time.
//!
//! [`decide`] is the pure state machine: given the Lease as read (or its
//! absence) and the time, create it, renew it, take it over (absent holder
//! or expired), or follow its holder. [`Elector`] remembers the outcome of
//! each write and answers "may I act now?": only after a successful write,
//! and only until the renew deadline passes without another one — a leader
//! that cannot reach the API server steps down before its lease expires,
//! so two replicas never act at once. A write answered `409 Conflict` means
//! someone else wrote the Lease first: that is a lost election, at once.
//! [`LeaseLock`] is the thin I/O around them.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::{Duration, Instant};

/// What the Lease says, in plain numbers (microseconds since the epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    pub holder: Option<String>,
    pub renew_us: Option<i64>,
    pub acquire_us: Option<i64>,
    pub duration_s: Option<i32>,
    pub transitions: i32,
}

/// What to do with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is none: create it, holding it.
    Create,
    /// We hold it: write a new renew time.
    Renew,
    /// Nobody valid holds it (no holder, or it expired): take it over.
    TakeOver,
    /// Someone else holds it for `remaining` more.
    Follow { holder: String, remaining: Duration },
}

/// Decide what `me` does with `lease` at `now_us`. A lease without a
/// duration uses `default_duration`.
pub fn decide(
    me: &str,
    lease: Option<&LeaseRecord>,
    now_us: i64,
    default_duration: Duration,
) -> Decision {
    let Some(l) = lease else { return Decision::Create };
    let holder = l.holder.as_deref().unwrap_or("");
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let dur_us = match l.duration_s {
        Some(s) if s > 0 => i64::from(s) * 1_000_000,
        _ => i64::try_from(default_duration.as_micros()).unwrap_or(i64::MAX),
    };
    // Never renewed: expired. A renew time in the future (clock skew) counts
    // from now: the holder keeps it for at most one duration from here.
    let Some(renew) = l.renew_us.or(l.acquire_us) else { return Decision::TakeOver };
    let expires = renew.min(now_us).saturating_add(dur_us);
    if now_us >= expires {
        return Decision::TakeOver;
    }
    Decision::Follow {
        holder: holder.to_string(),
        remaining: Duration::from_micros(u64::try_from(expires - now_us).unwrap_or(0)),
    }
}

/// The record after `me` acts on `d` at `now_us` (None for `Follow`).
pub fn next_record(
    me: &str,
    current: Option<&LeaseRecord>,
    d: &Decision,
    now_us: i64,
    duration: Duration,
) -> Option<LeaseRecord> {
    let secs = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let fresh = |transitions| LeaseRecord {
        holder: Some(me.to_string()),
        renew_us: Some(now_us),
        acquire_us: Some(now_us),
        duration_s: Some(secs),
        transitions,
    };
    match d {
        Decision::Create => Some(fresh(0)),
        Decision::TakeOver => {
            let t = current.map(|c| c.transitions).unwrap_or(0);
            Some(fresh(t.saturating_add(1)))
        }
        Decision::Renew => {
            let mut r = current.cloned().unwrap_or_else(|| fresh(0));
            r.renew_us = Some(now_us);
            r.duration_s = Some(secs);
            Some(r)
        }
        Decision::Follow { .. } => None,
    }
}

/// The result of one attempt to take or keep the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold it (created, renewed or taken over).
    Held,
    /// Someone else holds it.
    Follower(String),
    /// Another writer changed it between our read and our write.
    Lost,
    /// The API server could not be asked.
    Failed(String),
}

/// Whether this replica may act: leadership as seen from the outcomes of
/// its writes (see the module's doc).
#[derive(Debug)]
pub struct Elector {
    renew_deadline: Duration,
    last_held: Option<Instant>,
}

impl Elector {
    /// `renew_deadline` must be shorter than the lease duration: the
    /// margin is what keeps two replicas from acting at once.
    pub fn new(renew_deadline: Duration) -> Elector {
        Elector { renew_deadline, last_held: None }
    }

    /// Record an attempt's outcome at `now`; returns whether we lead.
    pub fn observe(&mut self, a: &Attempt, now: Instant) -> bool {
        match a {
            Attempt::Held => self.last_held = Some(now),
            Attempt::Follower(_) | Attempt::Lost => self.last_held = None,
            // Keep leading until the deadline: a blip is not a loss.
            Attempt::Failed(_) => {}
        }
        self.is_leader(now)
    }

    pub fn is_leader(&self, now: Instant) -> bool {
        self.last_held.is_some_and(|t| now.saturating_duration_since(t) < self.renew_deadline)
    }
}

fn record_of(l: &Lease) -> LeaseRecord {
    let s = l.spec.clone().unwrap_or_default();
    LeaseRecord {
        holder: s.holder_identity,
        renew_us: s.renew_time.map(|t| t.0.as_microsecond()),
        acquire_us: s.acquire_time.map(|t| t.0.as_microsecond()),
        duration_s: s.lease_duration_seconds,
        transitions: s.lease_transitions.unwrap_or(0),
    }
}

fn micro(us: i64) -> Option<MicroTime> {
    Timestamp::from_microsecond(us).ok().map(MicroTime)
}

fn spec_of(r: &LeaseRecord) -> LeaseSpec {
    LeaseSpec {
        holder_identity: r.holder.clone(),
        renew_time: r.renew_us.and_then(micro),
        acquire_time: r.acquire_us.and_then(micro),
        lease_duration_seconds: r.duration_s,
        lease_transitions: Some(r.transitions),
        ..Default::default()
    }
}

/// The Lease `namespace/name` as a lock held by `identity`.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// Read the Lease, decide, write: one round of the election.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Attempt {
        let now_us = now.as_microsecond();
        let cur = match self.api.get_opt(&self.name).await {
            Ok(l) => l,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        let rec = cur.as_ref().map(record_of);
        let d = decide(&self.identity, rec.as_ref(), now_us, self.duration);
        let Some(next) = next_record(&self.identity, rec.as_ref(), &d, now_us, self.duration)
        else {
            return match d {
                Decision::Follow { holder, .. } => Attempt::Follower(holder),
                _ => Attempt::Lost,
            };
        };
        let r = match cur {
            None => {
                let l = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(spec_of(&next)),
                };
                self.api.create(&PostParams::default(), &l).await
            }
            Some(mut l) => {
                // Replace carries the resourceVersion we read: a concurrent
                // writer makes it fail with 409, never both succeed.
                l.spec = Some(spec_of(&next));
                self.api.replace(&self.name, &PostParams::default(), &l).await
            }
        };
        match r {
            Ok(_) => Attempt::Held,
            Err(kube::Error::Api(s)) if s.code == 409 => Attempt::Lost,
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }
}

impl LeaseLock {
    /// Give the Lease up (on shutdown) so another replica takes over at
    /// once instead of waiting for it to expire: clear the holder, if it is
    /// still us, with the version read. True when released.
    pub async fn release(&self) -> bool {
        let Ok(Some(mut l)) = self.api.get_opt(&self.name).await else { return false };
        let mut spec = l.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return false;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        l.spec = Some(spec);
        self.api.replace(&self.name, &PostParams::default(), &l).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;
    const D: Duration = Duration::from_secs(15);

    fn held(by: &str, renew_s: i64) -> LeaseRecord {
        LeaseRecord {
            holder: Some(by.into()),
            renew_us: Some(renew_s * S),
            acquire_us: Some(renew_s * S),
            duration_s: Some(15),
            transitions: 3,
        }
    }

    #[test]
    fn lease_decisions() {
        assert_eq!(decide("a", None, 100 * S, D), Decision::Create);
        assert_eq!(decide("a", Some(&held("a", 10)), 100 * S, D), Decision::Renew);
        // b renewed 5 s ago: valid for 10 more.
        assert_eq!(
            decide("a", Some(&held("b", 95)), 100 * S, D),
            Decision::Follow { holder: "b".into(), remaining: Duration::from_secs(10) }
        );
        // b's lease ran out exactly now, or long ago.
        assert_eq!(decide("a", Some(&held("b", 85)), 100 * S, D), Decision::TakeOver);
        assert_eq!(decide("a", Some(&held("b", 1)), 100 * S, D), Decision::TakeOver);
        // Released (no holder) or never renewed.
        let mut r = held("", 99);
        assert_eq!(decide("a", Some(&r), 100 * S, D), Decision::TakeOver);
        r = held("b", 0);
        r.renew_us = None;
        r.acquire_us = None;
        assert_eq!(decide("a", Some(&r), 100 * S, D), Decision::TakeOver);
        // A renew time ahead of our clock is held one duration from now.
        assert_eq!(
            decide("a", Some(&held("b", 1000)), 100 * S, D),
            Decision::Follow { holder: "b".into(), remaining: D }
        );
        // No duration on the lease: ours applies.
        let mut r = held("b", 95);
        r.duration_s = None;
        assert!(matches!(decide("a", Some(&r), 100 * S, D), Decision::Follow { .. }));
    }

    #[test]
    fn records_after_acting() {
        let cur = held("b", 50);
        let t = next_record("a", Some(&cur), &Decision::TakeOver, 100 * S, D).unwrap();
        assert_eq!(t.holder.as_deref(), Some("a"));
        assert_eq!(t.transitions, 4);
        assert_eq!(t.acquire_us, Some(100 * S));
        let mine = held("a", 50);
        let r = next_record("a", Some(&mine), &Decision::Renew, 100 * S, D).unwrap();
        assert_eq!((r.acquire_us, r.renew_us, r.transitions), (Some(50 * S), Some(100 * S), 3));
        assert_eq!(next_record("a", None, &Decision::Create, 1, D).unwrap().transitions, 0);
        let f = Decision::Follow { holder: "b".into(), remaining: D };
        assert_eq!(next_record("a", Some(&cur), &f, 1, D), None);
    }

    #[test]
    fn elector_steps_down() {
        let t0 = Instant::now();
        let mut e = Elector::new(Duration::from_secs(10));
        assert!(!e.is_leader(t0));
        assert!(e.observe(&Attempt::Held, t0));
        // An API blip keeps us leading until the deadline, no longer.
        assert!(e.observe(&Attempt::Failed("timeout".into()), t0 + Duration::from_secs(5)));
        assert!(!e.observe(&Attempt::Failed("timeout".into()), t0 + Duration::from_secs(10)));
        // A lost write ends leadership at once.
        assert!(e.observe(&Attempt::Held, t0 + Duration::from_secs(11)));
        assert!(!e.observe(&Attempt::Lost, t0 + Duration::from_secs(12)));
        assert!(e.observe(&Attempt::Held, t0 + Duration::from_secs(13)));
        assert!(!e.observe(&Attempt::Follower("b".into()), t0 + Duration::from_secs(14)));
    }
}
