//! A blocking client of the dataplane API (used by the CLI and the agent).

use super::{ApiError, Envelope, ErrorCode, Outcome, Reply, Request, Response, VERSIONS};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Failure of a call: the transport, or the dataplane's error reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("dataplane API unreachable: {0}")]
    Io(#[from] io::Error),
    #[error("dataplane API: {0}")]
    Api(#[from] ApiError),
    #[error("dataplane API sent an invalid response: {0}")]
    Protocol(String),
}

pub struct Client {
    reader: BufReader<UnixStream>,
    out: UnixStream,
    next_id: u64,
    /// The negotiated protocol version.
    pub version: u32,
}

impl Client {
    /// Connect and say hello.
    pub fn connect(path: &Path, client: &str) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut c =
            Client { out: s.try_clone()?, reader: BufReader::new(s), next_id: 1, version: 0 };
        match c.call(Request::Hello { versions: VERSIONS.to_vec(), client: client.into() })? {
            Reply::Hello { version, .. } => c.version = version,
            other => return Err(ClientError::Protocol(format!("hello answered with {other:?}"))),
        }
        Ok(c)
    }

    /// Send one request and wait for its response.
    pub fn call(&mut self, request: Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&Envelope { id, request })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        let mut resp = String::new();
        if self.reader.read_line(&mut resp)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "dataplane closed the connection",
            )
            .into());
        }
        let r: Response = serde_json::from_str(&resp)
            .map_err(|e| ClientError::Protocol(format!("{e}: {resp}")))?;
        if r.id != Some(id) {
            return Err(ClientError::Protocol(format!("response id {:?} for request {id}", r.id)));
        }
        match r.outcome {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Error(e) => Err(e.into()),
        }
    }
}

impl ClientError {
    /// The API error code, if the dataplane answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}
