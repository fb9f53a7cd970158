//! The wire between a running sluice and the process that replaces it.
//!
//! The old process spawns the new binary with one end of a unix socket
//! pair as descriptor 3 (`--takeover-fd 3`) and sends, in one message,
//! an [`Offer`] and every listening socket with `SCM_RIGHTS`: the kernel's
//! accept queues travel with the sockets and are never closed. Then both
//! sides speak in [`Message`]s, one JSON line each: the new process says it
//! is `Ready` (or why it `Failed`); the old one stops accepting and reports
//! the connections it still holds until it exits; the new one asks it to
//! `Close` some of them when an admin stops or forces a backend.
//!
//! The report is checked every 100 ms and sent only when the set of held
//! connections changed. The first is `Held`, every connection's view by
//! backend; after it `HeldChanges` carries only the difference, by
//! backend: the connections that ended by identity (`[pid, id]`, the
//! process that holds it and its id there, unique also for those relayed
//! from an older process), and the new ones whole:
//!
//! ```text
//! {"type":"held_changes","gone":{"web1":[[4121,17],[4121,18]]},"new":{"web2":[{"id":3,"pid":4000,...}]}}
//! ```
//!
//! A sluice from before `HeldChanges` would skip such a line and so miss
//! a new connection, which could end a drain the old process still holds
//! open. So `Ready` says `held_changes: true`; one without it is sent a
//! whole `Held` on every change, as before, and a new process takes either.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::api::{ConnKey, ConnView};
use crate::backend::State;

/// The descriptor number the new process finds its end of the pair at.
pub const CHILD_FD: RawFd = 3;

/// The most descriptors one offer carries (the kernel's limit is 253).
pub const MAX_SOCKETS: usize = 250;

/// What the old process hands over besides the sockets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Offer {
    pub pid: u32,
    pub version: String,
    /// What each passed descriptor is, in the order they travel.
    pub sockets: Vec<SocketKind>,
    /// Admin states by backend name, removed backends' included.
    pub states: HashMap<String, State>,
    /// Health by backend name: whether it is up.
    pub health: HashMap<String, bool>,
    /// Whether the old process was leaving its pair.
    #[serde(default)]
    pub leaving: bool,
}

/// What a passed listening socket is for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SocketKind {
    /// A service's listener for one worker.
    Service { name: String, worker: usize },
    /// The admin API's TCP listener.
    Admin,
    /// The admin API's unix socket.
    AdminSocket,
}

/// Everything said after the offer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// New to old: it accepts on every socket now. `held_changes`: it
    /// reads [`Message::HeldChanges`]; a sluice from before them sends
    /// no such field, and is sent whole reports only.
    Ready {
        pid: u32,
        version: String,
        #[serde(default)]
        held_changes: bool,
    },
    /// New to old: it cannot take over, and why.
    Failed { error: String },
    /// Old to new: the connections it still holds, by backend name, the
    /// whole of them. The first report is one, and every report to a new
    /// process that did not say it reads `HeldChanges`.
    Held {
        backends: HashMap<String, Vec<ConnView>>,
    },
    /// Old to new: what changed since the last report, by backend name:
    /// the connections that ended, by identity (`[pid, id]`, which also
    /// names those relayed from an older process), and the new ones
    /// whole. Sent only to a process that said it reads them: one that
    /// skipped it would miss a new connection, and could end a drain that
    /// the old process still holds open.
    HeldChanges {
        #[serde(default, skip_serializing_if = "HashMap::is_empty")]
        gone: HashMap<String, Vec<ConnKey>>,
        #[serde(default, skip_serializing_if = "HashMap::is_empty")]
        new: HashMap<String, Vec<ConnView>>,
    },
    /// New to old: close its connections of `backend`; those idle for
    /// `idle_ms` (and not waiting for a reply) only, when given.
    Close {
        backend: String,
        idle_ms: Option<u64>,
    },
}

impl Message {
    /// One line of the wire.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("messages serialize");
        s.push('\n');
        s
    }
}

/// Sends the offer and its sockets in one message.
pub fn send_offer(to: &UnixStream, offer: &Offer, fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_SOCKETS {
        return Err(io::Error::other(format!(
            "{} listening sockets are more than one hand-over carries ({MAX_SOCKETS})",
            fds.len()
        )));
    }
    let mut line = serde_json::to_vec(offer).map_err(io::Error::other)?;
    line.push(b'\n');
    let rights = [ControlMessage::ScmRights(fds)];
    let mut sent = sendmsg::<()>(
        to.as_raw_fd(),
        &[IoSlice::new(&line)],
        &rights,
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    // The descriptors went with the first byte; the rest is plain bytes.
    while sent < line.len() {
        sent += std::io::Write::write(&mut &*to, &line[sent..])?;
    }
    Ok(())
}

/// Receives the offer and its sockets.
pub fn recv_offer(from: &UnixStream) -> io::Result<(Offer, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            from.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(rights) = c {
                // SAFETY: the kernel just gave these descriptors to this
                // process; nothing else owns them.
                fds.extend(
                    rights
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the old process closed the hand-over before its offer",
        ));
    }
    let mut line = buf[..n].to_vec();
    // A long offer may come in several reads; it ends at its newline, and
    // the old process says nothing more until this one is ready.
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if (&*from).read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the hand-over ended inside the offer",
            ));
        }
        line.push(byte[0]);
    }
    let offer: Offer = serde_json::from_slice(&line).map_err(io::Error::other)?;
    if offer.sockets.len() != fds.len() {
        return Err(io::Error::other(format!(
            "the offer names {} sockets but {} came",
            offer.sockets.len(),
            fds.len()
        )));
    }
    Ok((offer, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_carries_its_sockets_and_they_still_accept() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let offer = Offer {
            pid: 1,
            version: "0.0.0".into(),
            sockets: vec![SocketKind::Service {
                name: "web".into(),
                worker: 0,
            }],
            states: [("web1".to_string(), State::Drained)].into(),
            health: [("web1".to_string(), false)].into(),
            leaving: true,
        };
        send_offer(&a, &offer, &[listener.as_raw_fd()]).unwrap();
        // A client queued before the hand-over is accepted after it.
        let client = std::net::TcpStream::connect(addr).unwrap();
        drop(listener);
        let (got, fds) = recv_offer(&b).unwrap();
        assert_eq!(got, offer);
        let taken = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        let (_, peer) = taken.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
    }

    #[test]
    fn messages_are_lines_of_json() {
        let m = Message::Close {
            backend: "web1".into(),
            idle_ms: Some(500),
        };
        let line = m.line();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert_eq!(serde_json::from_str::<Message>(&line).unwrap(), m);
    }

    /// The messages as a sluice from before `HeldChanges` reads them.
    mod before {
        use super::*;

        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum Message {
            Ready {
                pid: u32,
                version: String,
            },
            Failed {
                error: String,
            },
            Held {
                backends: HashMap<String, Vec<ConnView>>,
            },
            Close {
                backend: String,
                idle_ms: Option<u64>,
            },
        }
    }

    #[test]
    fn a_sluice_from_before_held_changes_and_this_one_understand_each_other() {
        // A new process of this version says it reads changes; one from
        // before reads its Ready all the same.
        let ready = Message::Ready {
            pid: 7,
            version: "0.2.0".into(),
            held_changes: true,
        };
        let read: before::Message = serde_json::from_str(&ready.line()).unwrap();
        assert_eq!(
            read,
            before::Message::Ready {
                pid: 7,
                version: "0.2.0".into()
            }
        );
        // One from before does not say it: it is sent whole reports.
        let old = r#"{"type":"ready","pid":7,"version":"0.1.0"}"#;
        assert!(matches!(
            serde_json::from_str(old).unwrap(),
            Message::Ready {
                held_changes: false,
                ..
            }
        ));
        // A whole report of one from before reads here.
        let held = r#"{"type":"held","backends":{"a":[{"id":1,"client":"1.2.3.4:5","service":"web","age_ms":1,"idle_ms":1,"bytes_in":0,"bytes_out":0,"pid":9}]}}"#;
        assert!(matches!(
            serde_json::from_str(held).unwrap(),
            Message::Held { backends } if backends["a"][0].key() == (9, 1)
        ));
        // A report of changes is not one it could read, which is why it is
        // never sent one.
        let changes = Message::HeldChanges {
            gone: [("a".to_string(), vec![(9, 1)])].into(),
            new: HashMap::new(),
        };
        let line = changes.line();
        assert_eq!(
            line,
            "{\"type\":\"held_changes\",\"gone\":{\"a\":[[9,1]]}}\n"
        );
        assert!(serde_json::from_str::<before::Message>(&line).is_err());
        assert_eq!(serde_json::from_str::<Message>(&line).unwrap(), changes);
    }
}
