//! Updating sluice itself without dropping anyone.
//!
//! The old side ([`Upgrader`]): spawn the new binary with the hand-over
//! socket, offer it every listening socket and the admin state, wait until
//! it says it accepts, then stop accepting here (the sockets stay open in
//! the new process, so no client is refused), tell the new process which
//! connections are still held here until they end, and exit.
//!
//! The new side ([`TakeOver`]): take the sockets and the state, serve, say
//! `Ready`, and count the old process's connections in every backend's
//! drain until it has gone. A drain is `drained` only when neither
//! process holds a connection to the backend.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::api::{ConnKey, ConnView, UpgradeView};
use crate::backend::CloseElsewhere;
use crate::handover::{self, Message, Offer, SocketKind};
use crate::state::Shared;

/// How long a new process may take to say it accepts.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How often the old process reports what it still holds.
const REPORT_EVERY: Duration = Duration::from_millis(100);

/// This build's version, as `/healthz` and the hand-over report it.
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The commit this build was made from (`build.rs`), or `unknown`.
pub fn commit() -> &'static str {
    env!("SLUICE_GIT_COMMIT")
}

/// The old process's side: everything an upgrade needs to hand over.
#[derive(Debug)]
pub struct Upgrader {
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    /// The pid file the new process takes over (`--pidfile`).
    pidfile: Option<PathBuf>,
    /// The binary this process was started from, taken at start, since the
    /// file may be replaced by then.
    binary: Option<PathBuf>,
    /// Copies of every listening socket, in offer order; released at
    /// shutdown, since a copy keeps a socket listening.
    sockets: std::sync::Mutex<Vec<(SocketKind, OwnedFd)>>,
    /// Set while an upgrade runs, and for good once one succeeded.
    busy: AtomicBool,
    /// Cancelled when a new process has taken over: stop accepting.
    pub handed_over: CancellationToken,
}

impl Upgrader {
    pub fn new(
        shared: Arc<Shared>,
        config_path: Option<PathBuf>,
        pidfile: Option<PathBuf>,
        sockets: Vec<(SocketKind, RawFd)>,
    ) -> std::io::Result<Upgrader> {
        let sockets = sockets
            .into_iter()
            .map(|(kind, fd)| {
                // SAFETY: `fd` is a listening socket this process owns and
                // keeps open while the copy is made.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                Ok((kind, fd.try_clone_to_owned()?))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Upgrader {
            shared,
            config_path,
            pidfile,
            binary: std::env::current_exe().ok(),
            sockets: std::sync::Mutex::new(sockets),
            busy: AtomicBool::new(false),
            handed_over: CancellationToken::new(),
        })
    }

    /// Starts `binary` (or this process's own), hands everything over and
    /// waits until it accepts. On any failure the new process is killed and
    /// this one goes on as if nothing happened.
    pub async fn upgrade(&self, binary: Option<PathBuf>) -> Result<UpgradeView, String> {
        let Some(config) = self.config_path.clone() else {
            return Err("this sluice was not started with `sluice run --config FILE`, so a new process would not know its configuration".into());
        };
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(if self.handed_over.is_cancelled() {
                "this process has already handed over to a newer one; ask that one".into()
            } else {
                "an upgrade is already in progress; wait for it to end".into()
            });
        }
        let result = self.hand_over(config, binary).await;
        if result.is_err() {
            self.busy.store(false, Ordering::SeqCst);
        }
        result
    }

    async fn hand_over(
        &self,
        config: PathBuf,
        binary: Option<PathBuf>,
    ) -> Result<UpgradeView, String> {
        if self.shared.shutting_down.load(Ordering::SeqCst) {
            return Err("this process is shutting down".into());
        }
        let binary = binary
            .or_else(|| self.binary.clone())
            .ok_or("cannot tell which binary this process runs; give --binary")?;
        check_executable(&binary)?;
        let (ours, theirs) =
            StdUnixStream::pair().map_err(|e| format!("cannot make the hand-over socket: {e}"))?;
        let mut child = spawn(
            &binary,
            &config,
            self.pidfile.as_deref(),
            theirs.as_raw_fd(),
        )
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        drop(theirs);
        let new_pid = child.id();
        tracing::info!(binary = %binary.display(), pid = new_pid, "upgrade: new process started; handing over the listening sockets");
        // Sent under the lock, so a shutdown cannot close the sockets
        // while they travel. The offer is small: the send does not wait.
        let sent = {
            let sockets = self.sockets.lock().expect("sockets lock");
            if sockets.is_empty() {
                Err("this process is shutting down".to_string())
            } else {
                let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
                handover::send_offer(&ours, &self.offer(&sockets), &fds).map_err(|e| {
                    match e.kind() {
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                            "the new process ended before it was ready".to_string()
                        }
                        _ => format!("cannot hand the sockets over: {e}"),
                    }
                })
            }
        };
        let ready = async {
            sent?;
            ours.set_nonblocking(true).map_err(|e| e.to_string())?;
            let stream = UnixStream::from_std(ours).map_err(|e| e.to_string())?;
            let (read, write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            match lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<Message>(&line) {
                    Ok(Message::Ready {
                        pid,
                        version,
                        held_changes,
                    }) => Ok((pid, version, held_changes, lines, write)),
                    Ok(Message::Failed { error }) => {
                        Err(format!("the new process refused: {error}"))
                    }
                    _ => Err(format!("the new process said something unexpected: {line}")),
                },
                Ok(None) | Err(_) => Err("the new process ended before it was ready".to_string()),
            }
        };
        let outcome = match tokio::time::timeout(READY_DEADLINE, ready).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the new process was not ready within {}",
                crate::config::format_duration(READY_DEADLINE)
            )),
        };
        let (pid, new_version, held_changes, lines, write) = match outcome {
            Ok(ok) => ok,
            Err(why) => {
                // How it ended, if it ended by itself; else it is stopped.
                let why = match child.try_wait() {
                    Ok(Some(status)) => format!("{why} ({status})"),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        why
                    }
                };
                tracing::error!("upgrade failed, this process goes on serving: {why}");
                return Err(why);
            }
        };
        // The new process outlives this one; the service manager (or init)
        // reaps it.
        std::mem::forget(child);
        tracing::info!(pid, version = %new_version, live = self.shared.live(), "upgrade: the new process accepts; this one stops accepting and lets its connections finish");
        // The state file is the new process's from now; stop writing it
        // before anything else can change here.
        self.shared.stop_saving();
        self.handed_over.cancel();
        let reporter = Reporter::new(held_changes);
        self.shared
            .tasks
            .spawn(report_held(self.shared.clone(), reporter, lines, write));
        Ok(UpgradeView {
            old_pid: std::process::id(),
            old_version: version(),
            new_pid: pid,
            new_version,
            connections_left: self.shared.live(),
        })
    }

    /// Whether admin state changes must be refused here: a hand-over is
    /// under way (the offer holds the states as they were) or done (the
    /// new process holds them now).
    pub fn frozen(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Drops the copies of the listening sockets: at shutdown, so that the
    /// sockets close with the listeners.
    pub fn release(&self) {
        self.sockets.lock().expect("sockets lock").clear();
    }

    fn offer(&self, sockets: &[(SocketKind, OwnedFd)]) -> Offer {
        Offer {
            pid: std::process::id(),
            version: version(),
            sockets: sockets.iter().map(|(k, _)| k.clone()).collect(),
            states: self.shared.admin_states(),
            health: self
                .shared
                .backends()
                .iter()
                .map(|b| (b.name.clone(), b.healthy()))
                .collect(),
            leaving: self.shared.leaving.is_on(),
        }
    }
}

/// The binary must be there and executable, or the old process says so
/// before starting anything.
fn check_executable(binary: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not an executable file", binary.display()));
    }
    // A file anyone else could have written would run as sluice: only
    // root's or sluice's own user's, writable by its owner alone.
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if (meta.uid() != 0 && meta.uid() != me) || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} must belong to root or to sluice's user and be writable by its owner only",
            binary.display()
        ));
    }
    Ok(())
}

/// Starts `binary run --config CONFIG --takeover-fd 3` (and `--pidfile`,
/// which the new process rewrites), with `theirs` as its descriptor 3 and
/// this process's standard output and error.
fn spawn(
    binary: &std::path::Path,
    config: &std::path::Path,
    pidfile: Option<&std::path::Path>,
    theirs: RawFd,
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(binary);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--takeover-fd")
        .arg(handover::CHILD_FD.to_string())
        .stdin(std::process::Stdio::null());
    if let Some(p) = pidfile {
        cmd.arg("--pidfile").arg(p);
    }
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 and
    // fcntl on descriptors this process owns.
    unsafe {
        cmd.pre_exec(move || {
            if theirs == handover::CHILD_FD {
                // dup2 onto itself would keep close-on-exec set.
                if libc::fcntl(theirs, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(theirs, handover::CHILD_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Tells the new process, until this one exits, which connections are
/// still held here; closes those it asks to close.
async fn report_held(
    shared: Arc<Shared>,
    mut reporter: Reporter,
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    mut write: tokio::net::unix::OwnedWriteHalf,
) {
    let mut every = tokio::time::interval(REPORT_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {
                if let Some(report) = reporter.next(&shared)
                    && write.write_all(report.line().as_bytes()).await.is_err()
                {
                    return;
                }
            }
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Ok(Message::Close { backend, idle_ms }) = serde_json::from_str(&line)
                        && let Some(b) = shared.backend(&backend)
                    {
                        let n = match idle_ms {
                            Some(ms) => b.close_idle_here(Duration::from_millis(ms)),
                            None => b.close_all(),
                        };
                        tracing::info!(backend = %backend, closed = n, "closed at the new process's request");
                    }
                }
                _ => return,
            },
        }
    }
}

/// Identities of held connections by backend name, each list sorted; a
/// backend with none is absent.
type Keys = HashMap<String, Vec<ConnKey>>;

/// A quiet tick walks no table, but one in `WALK_EVERY` walks anyway:
/// see [`Marks`].
const WALK_EVERY: u32 = 10;

/// Decides each tick what the old process tells the new one: the whole
/// set first, then only what changed, and nothing while nothing did. A
/// tick that finds its [`Marks`] unmoved costs a few loads per backend; one
/// that walks costs the identities of the held connections, a sort and a
/// merge. Views are built only for the connections a report names.
#[derive(Debug)]
struct Reporter {
    /// Whether the new process reads `HeldChanges`; if not, every change
    /// is sent as a whole report, as a sluice before them expects.
    held_changes: bool,
    /// The identities the last report left the new process with.
    last: Option<Keys>,
    /// What the last walk saw.
    marks: Option<Marks>,
    /// Ticks since the last walk.
    quiet: u32,
}

/// What moves when the held set changes, read without walking a table.
/// A new connection takes an id; one that ends leaves its backend's table
/// smaller; a report of the older process counts in `previous`. The one
/// change they can miss: a connection that took its id before a walk and
/// entered its table after it, while another of that backend ended. The
/// counts then still hold, only an identity is stale, and the walk every
/// [`WALK_EVERY`] ticks sets it right.
#[derive(Debug, PartialEq)]
struct Marks {
    ids_given: u64,
    previous: u64,
    /// This process's connections by backend name, where there are any.
    mine: HashMap<String, usize>,
}

impl Marks {
    /// Whether nothing moved since the walk these were taken at; a few
    /// loads per backend, and no allocation.
    fn still(&self, ids_given: u64, previous: u64, shared: &Shared) -> bool {
        if (ids_given, previous) != (self.ids_given, self.previous) {
            return false;
        }
        let mut busy = 0;
        for b in shared.backends().iter() {
            let n = b.connection_count();
            if self.mine.get(&b.name).copied().unwrap_or(0) != n {
                return false;
            }
            busy += usize::from(n > 0);
        }
        // A backend that had some and has since left the list moved too.
        busy == self.mine.len()
    }
}

impl Reporter {
    fn new(held_changes: bool) -> Reporter {
        Reporter {
            held_changes,
            last: None,
            marks: None,
            quiet: 0,
        }
    }

    /// The report for this tick, if one is due.
    fn next(&mut self, shared: &Shared) -> Option<Message> {
        // Until the process before this one has reported, what it holds is
        // unknown; the new process counts a connection everywhere until
        // this one's first report, so that report waits.
        let previous = shared.previous_reports()?;
        // Read before the walk, so that what changes during it moves them.
        let ids_given = crate::backend::ids_given();
        if self.quiet + 1 < WALK_EVERY
            && self
                .marks
                .as_ref()
                .is_some_and(|m| m.still(ids_given, previous, shared))
        {
            self.quiet += 1;
            return None;
        }
        self.quiet = 0;
        let (now, mine) = held_keys(shared);
        self.marks = Some(Marks {
            ids_given,
            previous,
            mine,
        });
        let report = match &self.last {
            Some(last) => {
                let changes = diff(last, &now);
                if changes.is_empty() {
                    return None;
                }
                if self.held_changes {
                    Message::HeldChanges {
                        gone: changes.gone,
                        new: views(shared, &changes.new),
                    }
                } else {
                    Message::Held {
                        backends: views(shared, &now),
                    }
                }
            }
            None => Message::Held {
                backends: views(shared, &now),
            },
        };
        self.last = Some(now);
        Some(report)
    }
}

/// The identities of the connections the new process must count: this
/// process's, and those of the process before it, if that one still runs
/// (upgrades may follow each other faster than connections end); and how
/// many of each backend's are this process's. Every backend is looked
/// at, not only those counted busy: a count may lag the rows it is taken
/// from.
fn held_keys(shared: &Shared) -> (Keys, HashMap<String, usize>) {
    let pid = std::process::id();
    let (mut held, mut mine) = (Keys::new(), HashMap::new());
    let mut ids = Vec::new();
    let mut relayed = Vec::new();
    for b in shared.backends().iter() {
        ids.clear();
        ids.extend(b.connection_ids());
        // Ids alone sort faster than pairs; the relayed ones come sorted.
        ids.sort_unstable();
        relayed.clear();
        shared.previous_keys(&b.name, &mut relayed);
        if ids.is_empty() && relayed.is_empty() {
            continue;
        }
        if !ids.is_empty() {
            mine.insert(b.name.clone(), ids.len());
        }
        let ours = ids.iter().map(|&id| (pid, id));
        held.insert(b.name.clone(), merge(ours, relayed.iter().copied()));
    }
    (held, mine)
}

/// Two sorted lists of identities as one.
fn merge(a: impl Iterator<Item = ConnKey>, b: impl Iterator<Item = ConnKey>) -> Vec<ConnKey> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    let mut out = Vec::with_capacity(a.size_hint().0 + b.size_hint().0);
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x <= y => a.next(),
            (Some(_), Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(k) => out.push(k),
            None => return out,
        }
    }
}

/// What changed between two sets of identities, by backend name.
#[derive(Debug, Default, PartialEq)]
struct Changes {
    gone: Keys,
    new: Keys,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.gone.is_empty() && self.new.is_empty()
    }
}

/// The identities in `last` and not in `now` (gone), and the reverse
/// (new), per backend; one merge of two sorted lists each.
fn diff(last: &Keys, now: &Keys) -> Changes {
    let mut changes = Changes::default();
    let none = Vec::new();
    let names = last
        .keys()
        .chain(now.keys().filter(|b| !last.contains_key(*b)));
    for b in names {
        let (was, is) = (last.get(b).unwrap_or(&none), now.get(b).unwrap_or(&none));
        if was == is {
            continue;
        }
        let (mut gone, mut new) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < was.len() && j < is.len() {
            match was[i].cmp(&is[j]) {
                std::cmp::Ordering::Less => {
                    gone.push(was[i]);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    new.push(is[j]);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                }
            }
        }
        gone.extend_from_slice(&was[i..]);
        new.extend_from_slice(&is[j..]);
        if !gone.is_empty() {
            changes.gone.insert(b.clone(), gone);
        }
        if !new.is_empty() {
            changes.new.insert(b.clone(), new);
        }
    }
    changes
}

/// The views of the connections `keys` names: this process's from its
/// tables, the older process's as it reported them. One that ended since
/// its identity was taken is left out; the next report names it gone,
/// which the new process ignores for a row it never had.
fn views(shared: &Shared, keys: &Keys) -> HashMap<String, Vec<ConnView>> {
    let pid = std::process::id();
    let mut out = HashMap::new();
    for (name, keys) in keys {
        let Some(b) = shared.backend(name) else {
            continue;
        };
        let (mine, relayed): (Vec<ConnKey>, Vec<ConnKey>) =
            keys.iter().partition(|(p, _)| *p == pid);
        let mut rows: Vec<ConnView> = mine
            .iter()
            .filter_map(|&(_, id)| b.connection(id))
            .map(|c| ConnView::of(&c, pid))
            .collect();
        rows.extend(shared.previous_views(name, &relayed));
        if !rows.is_empty() {
            out.insert(name.clone(), rows);
        }
    }
    out
}

/// The new process's side: what it took, and its line to the old one.
#[derive(Debug)]
pub struct TakeOver {
    pub offer: Offer,
    /// The sockets, as the offer names them.
    pub sockets: Vec<(SocketKind, OwnedFd)>,
    link: StdUnixStream,
}

impl TakeOver {
    /// Receives the old process's offer on descriptor `fd`.
    pub fn receive(fd: RawFd) -> std::io::Result<TakeOver> {
        // SAFETY: the old process gave this descriptor to this one for the
        // hand-over; nothing else uses it.
        let link = unsafe { StdUnixStream::from_raw_fd(fd) };
        let (offer, fds) = handover::recv_offer(&link)?;
        let sockets = offer.sockets.iter().cloned().zip(fds).collect();
        Ok(TakeOver {
            offer,
            sockets,
            link,
        })
    }

    /// Tells the old process why this one cannot take over.
    pub fn fail(mut self, error: &str) {
        let line = Message::Failed {
            error: error.to_string(),
        }
        .line();
        let _ = std::io::Write::write_all(&mut self.link, line.as_bytes());
    }

    /// Says `Ready` (this process accepts on every socket), then follows
    /// what the old process still holds until it is gone.
    pub fn ready(self, shared: Arc<Shared>) -> std::io::Result<()> {
        let old_pid = self.offer.pid;
        self.link.set_nonblocking(true)?;
        let stream = UnixStream::from_std(self.link)?;
        let (read, mut write) = stream.into_split();
        let ready = Message::Ready {
            pid: std::process::id(),
            version: version(),
            held_changes: true,
        }
        .line();
        let (close_tx, mut close_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for b in shared.backends().iter() {
            let tx = close_tx.clone();
            b.close_elsewhere_with(Some(CloseElsewhere(Box::new(move |backend, idle| {
                let line = Message::Close {
                    backend: backend.to_string(),
                    idle_ms: idle.map(|d| d.as_millis() as u64),
                }
                .line();
                let _ = tx.send(line);
            }))));
        }
        shared.previous_started(old_pid, self.offer.version.clone());
        // Until the old process's first report, assume it holds a
        // connection to every backend: no drain may end before it is
        // known what that process still carries.
        for b in shared.backends().iter() {
            b.set_elsewhere(1);
        }
        shared.tasks.spawn(async move {
            if write.write_all(ready.as_bytes()).await.is_err() {
                return;
            }
            while let Some(line) = close_rx.recv().await {
                if write.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        let follow = shared.clone();
        shared.tasks.spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                take_report(&follow, &line);
            }
            follow.previous_exited();
        });
        Ok(())
    }
}

/// Applies one line of the old process's reports to what this process
/// counts of it; a line it cannot read changes nothing.
fn take_report(shared: &Shared, line: &str) {
    match serde_json::from_str(line) {
        Ok(Message::Held { backends }) => shared.previous_holds(backends),
        Ok(Message::HeldChanges { gone, new }) => shared.previous_changes(gone, new),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ConnGuard;
    use crate::config::Config;

    /// Processes this one relays from: one it took over from (`OLD`), and
    /// one that one took over from (`OLDER`); no test process has these.
    const OLD: u32 = u32::MAX;
    const OLDER: u32 = u32::MAX - 1;

    fn shared(backends: &[&str]) -> Arc<Shared> {
        let mut text = "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"web\"\n\
                        listen = \"127.0.0.1:0\"\n"
            .to_string();
        for b in backends {
            text.push_str(&format!(
                "[[backend]]\nname = \"{b}\"\naddress = \"127.0.0.1:1\"\nhealth_check = \"none\"\n"
            ));
        }
        let config = Config::parse("t.toml", &text).unwrap();
        let listens: Vec<_> = config.services.iter().map(|s| s.listen).collect();
        Shared::new(config, &listens, &Default::default())
    }

    fn connect(s: &Shared, backend: &str) -> ConnGuard {
        let client = "127.0.0.1:2".parse().unwrap();
        s.backend(backend)
            .unwrap()
            .try_acquire(client, "web".into())
            .unwrap()
    }

    fn mine(g: &ConnGuard) -> ConnKey {
        (std::process::id(), g.info().id)
    }

    /// A row an older process reported.
    fn row((pid, id): ConnKey) -> ConnView {
        ConnView {
            id,
            pid,
            client: format!("10.0.0.{}:{id}", pid % 200),
            service: "web".into(),
            age_ms: 1000,
            idle_ms: 10,
            bytes_in: 5,
            bytes_out: 7,
        }
    }

    fn keys(list: &[(&str, &[ConnKey])]) -> Keys {
        list.iter()
            .map(|(b, k)| {
                let mut k = k.to_vec();
                k.sort();
                (b.to_string(), k)
            })
            .collect()
    }

    /// Each backend's identities in a report, sorted.
    fn named(views: &HashMap<String, Vec<ConnView>>) -> Keys {
        views
            .iter()
            .map(|(b, rows)| {
                let mut k: Vec<ConnKey> = rows.iter().map(ConnView::key).collect();
                k.sort();
                (b.clone(), k)
            })
            .collect()
    }

    fn changes(m: Option<Message>) -> (Keys, Keys) {
        match m {
            Some(Message::HeldChanges { gone, new }) => (gone, named(&new)),
            other => panic!("not a report of changes: {other:?}"),
        }
    }

    fn whole(m: Option<Message>) -> Keys {
        match m {
            Some(Message::Held { backends }) => named(&backends),
            other => panic!("not a whole report: {other:?}"),
        }
    }

    #[test]
    fn a_diff_names_what_ended_and_what_began() {
        let last = keys(&[("a", &[(1, 1), (1, 2)])]);
        assert!(diff(&last, &last).is_empty(), "none");
        assert!(diff(&Keys::new(), &Keys::new()).is_empty());

        let more = keys(&[("a", &[(1, 1), (1, 2), (1, 3)]), ("b", &[(1, 4)])]);
        let added = keys(&[("a", &[(1, 3)]), ("b", &[(1, 4)])]);
        assert_eq!(
            diff(&last, &more),
            Changes {
                gone: Keys::new(),
                new: added.clone()
            },
            "additions, one on a backend that had none"
        );
        assert_eq!(
            diff(&more, &last),
            Changes {
                gone: added,
                new: Keys::new()
            },
            "removals, one leaving a backend with none"
        );

        let was = keys(&[("a", &[(1, 1), (1, 3), (1, 5)]), ("b", &[(1, 9)])]);
        let is = keys(&[("a", &[(1, 2), (1, 3), (1, 6)]), ("c", &[(1, 7)])]);
        assert_eq!(
            diff(&was, &is),
            Changes {
                gone: keys(&[("a", &[(1, 1), (1, 5)]), ("b", &[(1, 9)])]),
                new: keys(&[("a", &[(1, 2), (1, 6)]), ("c", &[(1, 7)])]),
            },
            "both"
        );

        // Rows of other processes: an id is another row under another pid.
        let was = keys(&[("a", &[(1, 5), (OLDER, 5), (OLD, 5)])]);
        let is = keys(&[("a", &[(1, 5), (OLDER, 6), (OLD, 5)])]);
        assert_eq!(
            diff(&was, &is),
            Changes {
                gone: keys(&[("a", &[(OLDER, 5)])]),
                new: keys(&[("a", &[(OLDER, 6)])]),
            },
            "an older process's rows"
        );
    }

    #[test]
    fn this_process_s_identities_and_relayed_ones_merge_in_order() {
        let ours = [(5, 1), (5, 4)];
        let relayed = [(2, 9), (5, 2), (OLDER, 1), (OLD, 1)];
        let mut want = [ours.as_slice(), relayed.as_slice()].concat();
        want.sort();
        assert_eq!(merge(ours.into_iter(), relayed.into_iter()), want);
        assert_eq!(merge(ours.into_iter(), std::iter::empty()), ours);
        assert_eq!(merge(std::iter::empty(), relayed.into_iter()), relayed);
    }

    #[test]
    fn a_report_is_whole_first_then_only_changes_and_none_without_one() {
        let s = shared(&["a", "b"]);
        let mut g: Vec<ConnGuard> = (0..3).map(|_| connect(&s, "a")).collect();
        let mut r = Reporter::new(true);
        let first: Vec<ConnKey> = g.iter().map(mine).collect();
        assert_eq!(whole(r.next(&s)), keys(&[("a", &first)]));
        assert!(r.next(&s).is_none(), "nothing changed");

        g.push(connect(&s, "b"));
        let b = mine(&g[3]);
        assert_eq!(changes(r.next(&s)), (Keys::new(), keys(&[("b", &[b])])));
        assert!(r.next(&s).is_none());

        let ended = mine(&g.remove(0));
        assert_eq!(changes(r.next(&s)), (keys(&[("a", &[ended])]), Keys::new()));

        let ended = mine(&g.remove(0));
        g.push(connect(&s, "a"));
        let began = mine(g.last().unwrap());
        assert_eq!(
            changes(r.next(&s)),
            (keys(&[("a", &[ended])]), keys(&[("a", &[began])]))
        );
        assert!(r.next(&s).is_none());
    }

    #[test]
    fn the_walk_every_few_ticks_finds_what_the_marks_missed() {
        let s = shared(&["a"]);
        let g: Vec<ConnGuard> = (0..3).map(|_| connect(&s, "a")).collect();
        let mut r = Reporter::new(true);
        whole(r.next(&s));
        // The change the marks cannot see, made by hand: the last walk
        // counted a connection that is not there and missed one that is.
        let real = mine(&g[0]);
        let stale = (real.0, u64::MAX);
        let last = r.last.as_mut().unwrap().get_mut("a").unwrap();
        last.retain(|k| *k != real);
        last.push(stale);
        let reported = (0..WALK_EVERY).find_map(|_| r.next(&s));
        assert_eq!(
            changes(reported),
            (keys(&[("a", &[stale])]), keys(&[("a", &[real])]))
        );
    }

    #[test]
    fn rows_relayed_from_an_older_process_keep_their_own_pid() {
        let s = shared(&["a"]);
        s.previous_started(OLD, "0.0.0".into());
        let g = connect(&s, "a");
        let mut r = Reporter::new(true);
        assert!(
            r.next(&s).is_none(),
            "not before the older process reported"
        );

        // OLD holds id 1, and relays OLDER's id 1: two rows.
        s.previous_holds([("a".to_string(), vec![row((OLD, 1)), row((OLDER, 1))])].into());
        assert_eq!(
            whole(r.next(&s)),
            keys(&[("a", &[mine(&g), (OLD, 1), (OLDER, 1)])])
        );

        s.previous_changes(
            [("a".to_string(), vec![(OLDER, 1)])].into(),
            [("a".to_string(), vec![row((OLD, 2))])].into(),
        );
        match r.next(&s) {
            Some(Message::HeldChanges { gone, new }) => {
                assert_eq!(gone, keys(&[("a", &[(OLDER, 1)])]));
                // As the older process reported it, with its own pid.
                let mut view = new["a"].clone();
                assert!(view[0].age_ms >= 1000);
                view[0].age_ms = 1000;
                assert_eq!(view, vec![row((OLD, 2))]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_process_from_before_held_changes_gets_whole_reports() {
        let s = shared(&["a"]);
        let mut g: Vec<ConnGuard> = (0..3).map(|_| connect(&s, "a")).collect();
        let mut r = Reporter::new(false);
        whole(r.next(&s));
        assert!(r.next(&s).is_none());
        g.remove(0);
        let left: Vec<ConnKey> = g.iter().map(mine).collect();
        assert_eq!(whole(r.next(&s)), keys(&[("a", &left)]));
        g.push(connect(&s, "a"));
        let left: Vec<ConnKey> = g.iter().map(mine).collect();
        assert_eq!(whole(r.next(&s)), keys(&[("a", &left)]));
    }

    /// What a new process shows of the old one's rows of `backend`, with
    /// the times that depend on when a row was reported left out.
    fn shown(s: &Shared, backend: &str) -> Vec<ConnView> {
        let (mut rows, more) = s.previous_connections_page(backend, None, usize::MAX);
        assert!(!more);
        for r in &mut rows {
            (r.age_ms, r.idle_ms) = (0, 0);
        }
        rows
    }

    #[test]
    fn changes_leave_the_new_process_where_whole_reports_would() {
        let me = std::process::id();
        let names = ["a", "b", "c"];
        let old = shared(&names);
        old.previous_started(OLD, "0.0.0".into());
        old.previous_holds(
            [
                ("a".to_string(), vec![row((OLD, 1)), row((OLDER, 1))]),
                ("b".to_string(), vec![row((OLD, 2))]),
            ]
            .into(),
        );
        // Two new processes: one reads changes, one only whole reports.
        let (by_changes, by_whole) = (shared(&names), shared(&names));
        for s in [&by_changes, &by_whole] {
            s.previous_started(me, "0.0.0".into());
        }
        let (mut changes, mut wholes) = (Reporter::new(true), Reporter::new(false));
        let mut g: Vec<ConnGuard> = Vec::new();
        let (no_keys, no_rows) = (HashMap::new, HashMap::new);
        for step in 0..10 {
            let sent = match step {
                0 => true,
                1 => {
                    g.extend((0..4).map(|_| connect(&old, "a")));
                    true
                }
                2 => {
                    g.push(connect(&old, "c"));
                    true
                }
                3 => {
                    g.remove(1);
                    true
                }
                4 => {
                    old.previous_changes([("a".to_string(), vec![(OLDER, 1)])].into(), no_rows());
                    true
                }
                5 => {
                    g.remove(0);
                    g.push(connect(&old, "b"));
                    old.previous_changes(
                        no_keys(),
                        [("c".to_string(), vec![row((OLDER, 3))])].into(),
                    );
                    true
                }
                6 => false,
                7 => {
                    g.clear();
                    old.previous_changes(
                        [
                            ("a".to_string(), vec![(OLD, 1)]),
                            ("b".to_string(), vec![(OLD, 2)]),
                            ("c".to_string(), vec![(OLDER, 3)]),
                        ]
                        .into(),
                        no_rows(),
                    );
                    true
                }
                8 => false,
                _ => {
                    g.push(connect(&old, "b"));
                    true
                }
            };
            let (c, w) = (changes.next(&old), wholes.next(&old));
            assert_eq!((c.is_some(), w.is_some()), (sent, sent), "step {step}");
            if let (Some(c), Some(w)) = (c, w) {
                take_report(&by_changes, &c.line());
                take_report(&by_whole, &w.line());
            }
            let (truth, _) = held_keys(&old);
            for name in names {
                let rows = shown(&by_changes, name);
                assert_eq!(rows, shown(&by_whole, name), "step {step}, {name}");
                let want = truth.get(name).cloned().unwrap_or_default();
                let got: Vec<ConnKey> = rows.iter().map(ConnView::key).collect();
                assert_eq!(got, want, "step {step}, {name}");
                let count = |s: &Shared| s.backend(name).unwrap().elsewhere();
                assert_eq!(count(&by_changes), want.len(), "step {step}, {name}");
                assert_eq!(count(&by_whole), want.len(), "step {step}, {name}");
            }
            let total = |s: &Shared| s.previous().unwrap().connections;
            assert_eq!(total(&by_changes), total(&by_whole), "step {step}");
        }
    }

    #[test]
    fn a_line_for_ended_connections_names_them_and_holds_no_view() {
        const KEPT: usize = 1000;
        const ENDED: usize = 1000;
        let s = shared(&["a"]);
        let mut g: Vec<ConnGuard> = (0..KEPT + ENDED).map(|_| connect(&s, "a")).collect();
        let mut r = Reporter::new(true);
        let first = r.next(&s).unwrap().line();
        let mut ended: Vec<ConnKey> = g.drain(..ENDED).map(|g| mine(&g)).collect();
        ended.sort();
        let line = r.next(&s).unwrap().line();
        // Not a view, of those kept or any other.
        assert!(!line.contains("client"), "{line}");
        match serde_json::from_str(&line).unwrap() {
            Message::HeldChanges { gone, new } => {
                assert!(new.is_empty());
                assert_eq!(gone, keys(&[("a", &ended)]));
            }
            other => panic!("{other:?}"),
        }
        // About 20 bytes an identity, against well over 100 a view.
        assert!(line.len() < ENDED * 32, "{} bytes", line.len());
        assert!(first.len() > (KEPT + ENDED) * 100, "{} bytes", first.len());
    }

    /// What a report tick costs with 100,000 connections held, against
    /// what the whole report cost. A measurement, so run it in a release
    /// build: `cargo test --release --lib -- --ignored --nocapture
    /// a_report_tick_at_100k`.
    #[test]
    #[ignore = "a measurement, for a release build"]
    fn a_report_tick_at_100k_connections() {
        use std::hint::black_box;
        use std::time::Instant;
        const N: usize = 100_000;
        const ROUNDS: u32 = 20;
        let s = shared(&["a"]);
        let mut g: Vec<ConnGuard> = (0..N).map(|_| connect(&s, "a")).collect();
        let mut r = Reporter::new(true);
        let t = Instant::now();
        let first = r.next(&s).unwrap().line().len();
        let first_took = t.elapsed();

        let t = Instant::now();
        for _ in 0..ROUNDS {
            black_box(held_keys(&s));
        }
        let gather = t.elapsed() / ROUNDS;
        let (now, _) = held_keys(&s);
        let t = Instant::now();
        for _ in 0..ROUNDS {
            black_box(diff(&now, &now));
        }
        let compare = t.elapsed() / ROUNDS;
        let t = Instant::now();
        for _ in 0..ROUNDS {
            assert!(r.next(&s).is_none());
        }
        let quiet = t.elapsed() / ROUNDS;
        let (t, mut bytes) = (Instant::now(), 0);
        for _ in 0..ROUNDS {
            g.truncate(g.len() - 100);
            bytes += r.next(&s).unwrap().line().len();
        }
        let draining = t.elapsed() / ROUNDS;
        let bytes = bytes / ROUNDS as usize;

        // The tick before: every view, their ids compared, and on a change
        // the whole line.
        let pid = std::process::id();
        let whole = || -> HashMap<String, Vec<ConnView>> {
            s.backends()
                .iter()
                .map(|b| {
                    let conns = b.connections();
                    let rows = conns.iter().map(|c| ConnView::of(c, pid));
                    (b.name.clone(), rows.collect())
                })
                .collect()
        };
        let t = Instant::now();
        for _ in 0..ROUNDS {
            let held = whole();
            let ids: HashMap<String, Vec<u64>> = held
                .iter()
                .map(|(b, rows)| (b.clone(), rows.iter().map(|c| c.id).collect()))
                .collect();
            black_box((ids, Message::Held { backends: held }.line()));
        }
        let before = t.elapsed() / ROUNDS;
        println!(
            "{N} connections: first (whole) report {first_took:?}, {first} bytes; \
             a tick: identities {gather:?}, their comparison {compare:?}, \
             nothing changed {quiet:?} (one in {WALK_EVERY} walks), 100 ended {draining:?} and {bytes} bytes; \
             the whole report each change: {before:?}"
        );
    }
}
