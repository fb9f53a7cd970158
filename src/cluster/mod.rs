//! Cluster mode (`[cluster]`): several sluice instances share one admin
//! state in etcd. A drain, stop or start sent to any instance is written
//! there with a compare-and-set and applied by every instance through a
//! watch; each instance publishes its live counts under a lease, so that a
//! drain is reported over only when it is over on every instance alive.
//!
//! This module talks to etcd (`etcd.rs`, built with the `cluster`
//! feature); what an instance knows of the cluster, and how an agreed
//! state enters the one state machine, is `state/cluster.rs`.

#[cfg(feature = "cluster")]
mod etcd;

use crate::backend::{DrainPolicy, State};
use crate::state::Agreed;

#[cfg(feature = "cluster")]
pub use etcd::{Cluster, agreed_states};

/// An admin change asked of the cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    Drain(DrainPolicy),
    Stop,
    Start,
}

impl Change {
    /// The agreed state after this change from `current` (`None`: active,
    /// as no admin changed it yet), or `None` when it changes nothing, as
    /// the same call on one instance would change nothing.
    pub fn next(self, current: Option<&Agreed>, by: &str, now_ms: u64) -> Option<Agreed> {
        let state = current.map_or(State::Active, |a| a.state);
        let agreed = |state, policy: DrainPolicy| Agreed {
            state,
            force_after_ms: policy.force_after.map(|d| d.as_millis() as u64),
            close_idle_ms: policy.close_idle.map(|d| d.as_millis() as u64),
            by: by.to_string(),
            at_ms: now_ms,
        };
        match (self, state) {
            (Change::Drain(p), State::Active) => Some(agreed(State::Draining, p)),
            // A repeated drain carries a new policy to every instance, each
            // of which keeps the tighter one, as here.
            (Change::Drain(p), State::Draining | State::Drained) if !p.is_empty() => {
                Some(agreed(State::Draining, p))
            }
            (Change::Drain(_), _) => None,
            (Change::Stop, State::Stopped) => None,
            (Change::Stop, _) => Some(agreed(State::Stopped, DrainPolicy::default())),
            (Change::Start, State::Active) => None,
            (Change::Start, _) => Some(agreed(State::Active, DrainPolicy::default())),
        }
    }
}

/// Without the `cluster` feature no configuration has a `[cluster]`
/// (the config refuses it), so there is never a cluster to talk to.
#[cfg(not(feature = "cluster"))]
#[derive(Debug)]
pub struct Cluster(());

#[cfg(not(feature = "cluster"))]
impl Cluster {
    pub async fn start(
        _: &std::sync::Arc<crate::state::Shared>,
    ) -> Result<Option<std::sync::Arc<Cluster>>, String> {
        Ok(None)
    }

    pub async fn write(&self, _: &str, _: Change) -> Result<(), String> {
        Err("this sluice was built without cluster support".into())
    }

    pub async fn stop(&self) {}
}

#[cfg(not(feature = "cluster"))]
pub async fn agreed_states(
    _: &crate::config::ClusterConfig,
) -> Result<std::collections::HashMap<String, State>, String> {
    Err("this sluice was built without cluster support".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_change_writes_only_what_the_same_call_here_would_change() {
        let at = |state| Agreed {
            state,
            force_after_ms: None,
            close_idle_ms: None,
            by: "a".into(),
            at_ms: 1,
        };
        let none = DrainPolicy::default();
        let timed = DrainPolicy {
            force_after: Some(Duration::from_secs(30)),
            close_idle: None,
        };
        let next =
            |c: Change, cur: Option<State>| c.next(cur.map(at).as_ref(), "b", 2).map(|a| a.state);
        assert_eq!(next(Change::Drain(none), None), Some(State::Draining));
        assert_eq!(next(Change::Drain(none), Some(State::Draining)), None);
        assert_eq!(
            next(Change::Drain(timed), Some(State::Draining)),
            Some(State::Draining)
        );
        assert_eq!(next(Change::Drain(timed), Some(State::Stopped)), None);
        assert_eq!(
            next(Change::Stop, Some(State::Draining)),
            Some(State::Stopped)
        );
        assert_eq!(next(Change::Stop, Some(State::Stopped)), None);
        assert_eq!(next(Change::Start, None), None);
        assert_eq!(
            next(Change::Start, Some(State::Stopped)),
            Some(State::Active)
        );
        let a = Change::Drain(timed).next(None, "lb2", 7).unwrap();
        assert_eq!(
            (a.force_after_ms, a.by.as_str(), a.at_ms),
            (Some(30_000), "lb2", 7)
        );
    }
}
