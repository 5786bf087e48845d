//! One logged-in connection for the script modes: a request, then frames until its reply
//! (events that come first are kept for [`Link::next_event`]). An error reply is
//! [`CliError::Server`] with the server's code. Calls `rookery::client` only.

use rookery::client::{classify, Connection, Connector, Incoming};
use rookery::protocol::{Request, Username};
use rookery::secret::Secret;
use serde_json::Value;
use std::collections::VecDeque;
use std::time::Duration;

use crate::{show, CliError, ServerArgs};

/// How long a reply may take before the request counts as failed (a send's reply comes after
/// its commit, which the server bounds well below this).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Link {
    conn: Connection,
    next_id: u64,
    /// Events that arrived while waiting for a reply.
    events: VecDeque<Value>,
    pub user: Username,
    pub token: Secret,
}

impl Link {
    /// Connects and logs in as `--user` with `password`.
    pub async fn login(
        server: &ServerArgs,
        connector: &Connector,
        password: Secret,
    ) -> Result<Link, CliError> {
        let user = server.username()?;
        let mut link = Link {
            conn: connector.connect(&server.url).await?,
            next_id: 0,
            events: VecDeque::new(),
            user: user.clone(),
            token: Secret::new(""),
        };
        let reply = link
            .call(&Request::Login {
                username: user,
                password,
            })
            .await?;
        link.token = Secret::new(reply["token"].as_str().unwrap_or_default());
        Ok(link)
    }

    /// A new connection resuming this one's token; the caller joins its rooms again.
    pub async fn reconnect(
        &mut self,
        server: &ServerArgs,
        connector: &Connector,
    ) -> Result<(), CliError> {
        self.conn = connector.connect(&server.url).await?;
        self.events.clear();
        let token = self.token.clone();
        self.call(&Request::Resume { token }).await?;
        Ok(())
    }

    /// Sends `request` and waits for its reply: the `ok` frame, or the error reply as an error.
    pub async fn call(&mut self, request: &Request) -> Result<Value, CliError> {
        self.call_within(request, REPLY_TIMEOUT).await
    }

    /// Like `call`, giving up after `limit`.
    pub async fn call_within(
        &mut self,
        request: &Request,
        limit: Duration,
    ) -> Result<Value, CliError> {
        self.next_id += 1;
        let id = self.next_id.to_string();
        self.conn.send_request(&id, request).await?;
        let waiting = async {
            loop {
                match classify(self.conn.recv().await?) {
                    Incoming::Reply { id: of, frame } if of == id => return Ok(frame),
                    Incoming::Reply { .. } => {}
                    Incoming::Event(frame) if frame["type"] == "error" => {
                        return Err(server_error(&frame))
                    }
                    Incoming::Event(frame) => self.events.push_back(frame),
                }
            }
        };
        let frame = tokio::time::timeout(limit, waiting)
            .await
            .map_err(|_| rookery::client::ClientError::Timeout)??;
        if frame["type"] == "error" {
            return Err(server_error(&frame));
        }
        Ok(frame)
    }

    /// The next event (not a reply).
    pub async fn next_event(&mut self) -> Result<Value, CliError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        loop {
            if let Incoming::Event(frame) = classify(self.conn.recv().await?) {
                return Ok(frame);
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.conn.send_close().await;
    }
}

/// The error reply `frame` as an error carrying its code.
pub fn server_error(frame: &Value) -> CliError {
    CliError::Server {
        code: show::line(frame["code"].as_str().unwrap_or("internal")),
        message: show::line(frame["message"].as_str().unwrap_or_default()),
    }
}
