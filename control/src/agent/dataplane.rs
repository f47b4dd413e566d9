//! The agent's link to the dataplane: one connection, re-established when
//! it breaks, with a full `sync` each time it is (re)made — so either side
//! can restart and they converge.

use ocelot_dataplane::api::client::{Client, ClientError};
use ocelot_dataplane::api::{Cidr, EndpointSpec, Reply, Request};
use std::path::PathBuf;
use std::sync::Mutex;

pub struct DataplaneLink {
    socket: PathBuf,
    conn: Mutex<Option<Client>>,
}

impl DataplaneLink {
    pub fn new(socket: PathBuf) -> DataplaneLink {
        DataplaneLink { socket, conn: Mutex::new(None) }
    }

    pub fn connected(&self) -> bool {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Connect if needed and push the full state. Returns whether a new
    /// connection was made.
    pub fn ensure(
        &self,
        desired: impl FnOnce() -> (Vec<EndpointSpec>, Vec<Cidr>),
    ) -> Result<bool, ClientError> {
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return Ok(false);
        }
        let mut c = Client::connect(&self.socket, "ocelot-agent")?;
        let (endpoints, pools) = desired();
        let n = endpoints.len();
        match c.call(Request::Sync { endpoints, pools }) {
            Ok(_) => tracing::info!(endpoints = n, "dataplane connected and synced"),
            // Endpoints the dataplane could not take are logged; the link stays.
            Err(ClientError::Api(e)) => tracing::error!("dataplane sync: {e}"),
            Err(e) => return Err(e),
        }
        *g = Some(c);
        Ok(true)
    }

    /// One request; a transport failure drops the connection (the next
    /// `ensure` reconnects and resyncs).
    pub fn call(&self, req: Request) -> Result<Reply, ClientError> {
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "dataplane not connected",
            )));
        }
        let r = g
            .as_mut()
            .map(|c| c.call(req))
            .unwrap_or_else(|| Err(ClientError::Protocol("no connection".into())));
        if matches!(r, Err(ClientError::Io(_)) | Err(ClientError::Protocol(_))) {
            *g = None;
        }
        r
    }

    /// Forget the connection (it will be re-made and resynced).
    pub fn reset(&self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
