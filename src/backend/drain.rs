//! A drain, the same operation whether it came from the API, `ctl`, or a
//! reload that removed the backend: out of rotation now, and done when
//! the last connection ends. A [`DrainPolicy`] may end it sooner:
//! `close_idle` closes connections idle for that long (not those waiting
//! for a reply), `force_after` closes what is left after that long.
//!
//! A backend has at most one policy at a time, kept for the drain's
//! generation, and at most one task that enforces it. Asking again while
//! the same drain runs tightens the policy: the earlier force deadline and
//! the shorter idle time win, so repeating a call never loosens a limit
//! and never adds a task. The task is tracked by the balancer's
//! [`Background`] set and ends with the drain, or at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Backend, IDLE_AFTER, State};
use crate::events::{Kind, PROGRESS_EVERY_MS};
use crate::shutdown::Background;

/// How a drain may end before its connections finish on their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainPolicy {
    /// Close the connections still open after this long.
    pub force_after: Option<Duration>,
    /// While draining, close connections idle for this long.
    pub close_idle: Option<Duration>,
}

impl DrainPolicy {
    #[cfg(test)]
    fn max_idle(self, d: Duration) -> DrainPolicy {
        DrainPolicy {
            close_idle: Some(d),
            ..self
        }
    }

    pub fn is_empty(&self) -> bool {
        self.force_after.is_none() && self.close_idle.is_none()
    }
}

/// The policy in force for one drain.
#[derive(Debug, Default)]
pub(super) struct Slot {
    generation: u64,
    force_at: Option<Instant>,
    close_idle: Option<Duration>,
    /// Whether a task enforces it.
    enforced: bool,
}

fn earlier<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A drain in progress, to wait on.
#[derive(Debug, Clone)]
pub struct Drain {
    backend: Arc<Backend>,
    generation: u64,
}

impl Drain {
    /// Whether the drain is over: the backend carries nothing and is out
    /// of rotation, or someone started it again.
    pub fn is_over(&self) -> bool {
        let b = &self.backend;
        b.is_drained() || b.generation() != self.generation && b.state() == State::Active
    }

    /// Waits at most `limit` for the drain to be over; returns whether it is.
    pub async fn wait(&self, limit: Duration) -> bool {
        self.backend.wait_until(limit, |_| self.is_over()).await
    }
}

impl Backend {
    /// Takes the backend out of rotation, letting its connections finish
    /// under `policy`. The generation is read under the transition lock, so
    /// a start that races the drain cannot lend it a generation that is not
    /// a drain's.
    pub fn drain(self: &Arc<Self>, policy: DrainPolicy, tasks: &Background) -> Drain {
        let (generation, began) = {
            let _one_at_a_time = self.transitions.lock().expect("transition lock");
            let began = self.transition_locked(&[State::Active], State::Draining);
            self.complete_drain_locked();
            (self.generation(), began)
        };
        let drain = Drain {
            backend: self.clone(),
            generation,
        };
        if began && self.events.is_some() {
            tasks.spawn(self.clone().report_progress(generation));
        }
        if !policy.is_empty() {
            self.tighten(generation, policy, tasks);
        }
        drain
    }

    fn tighten(self: &Arc<Self>, generation: u64, policy: DrainPolicy, tasks: &Background) {
        let start_task = {
            let mut slot = self.policy.lock().expect("policy lock");
            // A drain that a later transition ended has no policy to set.
            if !self.draining_since(generation) {
                return;
            }
            if slot.generation != generation {
                *slot = Slot {
                    generation,
                    ..Slot::default()
                };
            }
            let force_at = policy.force_after.map(|d| {
                let now = Instant::now();
                now.checked_add(d)
                    .unwrap_or(now + crate::config::MAX_DURATION)
            });
            slot.force_at = earlier(slot.force_at, force_at);
            slot.close_idle = earlier(slot.close_idle, policy.close_idle);
            !std::mem::replace(&mut slot.enforced, true)
        };
        if start_task {
            tasks.spawn(self.clone().enforce(generation));
        } else {
            // The running task reads the tightened policy when woken.
            self.changed.notify_waiters();
        }
    }

    /// Tells the event bus how the running drain, if any, progresses; for
    /// a drain restored at start, since it began in another process.
    pub fn report_drain(self: &Arc<Self>, tasks: &Background) {
        if self.events.is_some() && self.state() == State::Draining {
            tasks.spawn(self.clone().report_progress(self.generation()));
        }
    }

    /// Publishes the live and idle counts of the drain of `generation`
    /// while it runs, when they moved, at most every [`PROGRESS_EVERY_MS`].
    /// A sample, not a hook in `ConnGuard::drop`: the data path pays
    /// nothing, and the last count before a quiet spell is never lost.
    async fn report_progress(self: Arc<Self>, generation: u64) {
        let Some(bus) = self.events.clone() else {
            return;
        };
        let mut told = None;
        loop {
            let idle = self.idle_count(IDLE_AFTER);
            {
                // Checked and told under the transition lock, so no
                // progress can follow the `drained` of its drain.
                let _one_at_a_time = self.transitions.lock().expect("transition lock");
                if !self.draining_since(generation) {
                    return;
                }
                let live = self.live_everywhere();
                if told != Some((live, idle)) {
                    told = Some((live, idle));
                    bus.publish(Kind::Progress {
                        backend: self.name.clone(),
                        live,
                        idle,
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(PROGRESS_EVERY_MS)).await;
        }
    }

    /// Whether the drain of `generation` still runs.
    fn draining_since(&self, generation: u64) -> bool {
        self.state() == State::Draining && self.generation() == generation
    }

    /// Applies the policy of the drain of `generation` until it ends.
    async fn enforce(self: Arc<Self>, generation: u64) {
        loop {
            // Enabled before reading, so a change between the read and the
            // wait still wakes this task.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (force_at, close_idle) = {
                let slot = self.policy.lock().expect("policy lock");
                (slot.generation == generation).then_some((slot.force_at, slot.close_idle))
            }
            .unwrap_or_default();
            if !self.draining_since(generation) {
                break;
            }
            if force_at.is_some_and(|t| t <= Instant::now()) {
                tracing::info!(backend = %self.name, live = self.live(), "drain time limit reached: closing remaining connections");
                self.close_all();
                break;
            }
            if let Some(idle) = close_idle {
                let n = self.close_idle(idle);
                if n > 0 {
                    tracing::info!(backend = %self.name, closed = n, "closed idle connections of a draining backend");
                }
            }
            let every = close_idle.map(|idle| {
                Instant::now() + (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
            });
            match earlier(force_at, every) {
                Some(t) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
                None => changed.await,
            }
        }
        let mut slot = self.policy.lock().expect("policy lock");
        if slot.generation == generation {
            slot.enforced = false;
        }
    }

    /// Closes connections idle for at least `idle`, except those waiting
    /// for a reply from the backend; returns how many.
    fn close_idle(&self, idle: Duration) -> usize {
        self.close_elsewhere(Some(idle));
        self.close_idle_here(idle)
    }

    /// As `close_idle`, for this process's connections only.
    pub fn close_idle_here(&self, idle: Duration) -> usize {
        let mut n = 0;
        for c in self.conns.iter().filter(|c| c.closable_when_idle(idle)) {
            c.cancel.cancel();
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{acquire, backend};
    use super::*;

    #[test]
    fn policies_tighten() {
        let s = |x: u64| Some(Duration::from_secs(x));
        assert_eq!(earlier(s(5), s(3)), s(3));
        assert_eq!(earlier(s(5), None), s(5));
        assert_eq!(earlier(None, s(4)), s(4));
        assert_eq!(earlier::<Duration>(None, None), None);
    }

    #[tokio::test(start_paused = true)]
    async fn force_after_closes_what_is_left_of_its_own_drain_only() {
        let tasks = Background::default();
        let b = backend();
        let g = acquire(&b).unwrap();
        let policy = DrainPolicy {
            force_after: Some(Duration::from_secs(10)),
            close_idle: None,
        };
        b.drain(policy, &tasks);
        // A start and a new drain: the first drain's deadline is not this one's.
        b.start();
        let second = b.drain(DrainPolicy::default(), &tasks);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!g.info().cancel.is_cancelled());
        assert!(tasks.is_empty(), "the first drain's task ended with it");
        b.drain(policy, &tasks);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(g.info().cancel.is_cancelled());
        drop(g);
        assert!(second.is_over());
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_drains_keep_one_task_and_the_earliest_deadline() {
        let tasks = Background::default();
        let b = backend();
        let g = acquire(&b).unwrap();
        for secs in [100, 5, 50] {
            b.drain(
                DrainPolicy {
                    force_after: Some(Duration::from_secs(secs)),
                    close_idle: Some(Duration::from_secs(secs)),
                },
                &tasks,
            );
            assert_eq!(tasks.len(), 1);
        }
        tokio::time::sleep(Duration::from_millis(5100)).await;
        assert!(g.info().cancel.is_cancelled(), "the 5 s deadline held");
        drop(g);
        tokio::task::yield_now().await;
        assert!(tasks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_call_for_an_ended_drain_leaves_the_current_policy_alone() {
        let tasks = Background::default();
        let b = backend();
        let g = acquire(&b).unwrap();
        let first = b.drain(DrainPolicy::default(), &tasks).generation;
        b.start();
        let force = DrainPolicy {
            force_after: Some(Duration::from_secs(10)),
            close_idle: None,
        };
        b.drain(force, &tasks);
        // The first request's policy arrives after the start and new drain.
        b.tighten(
            first,
            DrainPolicy::default().max_idle(Duration::from_secs(3600)),
            &tasks,
        );
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(
            g.info().cancel.is_cancelled(),
            "the current drain's deadline held"
        );
    }
}
