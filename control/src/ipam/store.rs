//! Where IPAM state lives: the [`IpamStore`] trait, and [`FileStore`], the
//! state in a file shared by every agent using one datastore directory
//! (the Kubernetes one is [`crate::k8s::ipam::KubeStore`]).
//!
//! The file store: Each change is a transaction: take an exclusive `flock` on
//! the lock file, read, change, write a new file and rename it into place,
//! release. A crash mid-way leaves the old file whole; concurrent writers
//! (threads or processes) are serialised, so no address is handed out twice.

use super::IpamState;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A place IPAM state is kept, changed only in transactions.
///
/// `update` runs `f` on a copy of the state and persists what it changed.
/// An optimistic store (Kubernetes) runs `f` again on fresh state when a
/// write conflicts with another writer's, so `f` must be a pure function of
/// the state it is given: only its last run counts. IPAM's operations are
/// (allocation by handle returns what the handle already holds).
pub trait IpamStore: Send + Sync {
    /// Run `f` on the state and persist its changes (see the trait's doc).
    fn update(&self, f: &mut dyn FnMut(&mut IpamState)) -> io::Result<()>;
    /// A copy of the current state.
    fn load(&self) -> io::Result<IpamState>;
    /// A stamp that changes when the state may have changed (other nodes'
    /// block claims): compare two to know whether to look again.
    fn stamp(&self) -> Option<String>;
}

impl dyn IpamStore + '_ {
    /// Run `f` on the state, persist its changes and return what its last
    /// run returned.
    pub fn transact<R>(&self, mut f: impl FnMut(&mut IpamState) -> R) -> io::Result<R> {
        let mut out = None;
        self.update(&mut |s| out = Some(f(s)))?;
        out.ok_or_else(|| io::Error::other("the IPAM store never ran the transaction"))
    }
}

impl IpamStore for FileStore {
    fn update(&self, f: &mut dyn FnMut(&mut IpamState)) -> io::Result<()> {
        FileStore::transact(self, f)
    }

    fn load(&self) -> io::Result<IpamState> {
        FileStore::load(self)
    }

    fn stamp(&self) -> Option<String> {
        let m = std::fs::metadata(self.state_file()).ok()?;
        let t = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(format!("{}.{:09}/{}", t.as_secs(), t.subsec_nanos(), m.len()))
    }
}

/// The state file inside the store's directory.
const STATE_FILE: &str = "state.json";

pub struct FileStore {
    dir: PathBuf,
}

struct Locked(File);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: the fd is open for the life of `self.0`.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl FileStore {
    /// IPAM state under `dir` (created if missing).
    pub fn open(dir: &Path) -> io::Result<FileStore> {
        std::fs::create_dir_all(dir)?;
        Ok(FileStore { dir: dir.to_path_buf() })
    }

    fn lock(&self) -> io::Result<Locked> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.dir.join("lock"))?;
        loop {
            // SAFETY: flock on an fd we own; blocks until the lock is ours.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Locked(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn read(&self) -> io::Result<IpamState> {
        let p = self.dir.join(STATE_FILE);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}; refusing to overwrite it", p.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(IpamState::default()),
            Err(e) => Err(e),
        }
    }

    fn write(&self, s: &IpamState) -> io::Result<()> {
        let tmp = self.dir.join(format!("{STATE_FILE}.{}.tmp", std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(s).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(STATE_FILE))
    }

    /// Run `f` on the state under the lock; the state is written back only
    /// when `f` changed it.
    pub fn transact<R>(&self, f: impl FnOnce(&mut IpamState) -> R) -> io::Result<R> {
        let _lock = self.lock()?;
        let mut s = self.read()?;
        let before = s.clone();
        let r = f(&mut s);
        if s != before {
            self.write(&s)?;
        }
        Ok(r)
    }

    /// The file holding the state (watched for other nodes' changes).
    pub fn state_file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// A copy of the current state.
    pub fn load(&self) -> io::Result<IpamState> {
        let _lock = self.lock()?;
        self.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{Allocation, Ipam, PoolSpec, Request};

    #[test]
    fn file_store_through_the_trait() {
        let dir = std::env::temp_dir().join(format!("ocelot-store-trait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store: Box<dyn IpamStore> = Box::new(FileStore::open(&dir).unwrap());
        assert_eq!(store.stamp(), None, "no state written yet");
        let req = Request::Auto {
            pools: vec![PoolSpec {
                name: "p".into(),
                cidr: "10.1.0.0/24".parse().unwrap(),
                block_size: 26,
            }],
        };
        let a = Allocation {
            handle: "c/eth0".into(),
            node: "n1".into(),
            pod: "default/a".into(),
            attrs: Default::default(),
        };
        let got = store
            .transact(|st| Ipam { state: st, node: "n1" }.allocate(&req, a.clone()))
            .unwrap()
            .unwrap();
        let s1 = store.stamp();
        assert!(s1.is_some());
        assert_eq!(store.load().unwrap().blocks.len(), 1);
        // A transaction that changes nothing writes nothing.
        let again = store
            .transact(|st| Ipam { state: st, node: "n1" }.allocate(&req, a.clone()))
            .unwrap()
            .unwrap();
        assert!(again.existing && again.ips == got.ips);
        assert_eq!(store.stamp(), s1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
