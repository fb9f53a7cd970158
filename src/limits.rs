//! The file descriptor limit: raised to the hard limit at start, since a
//! proxy needs two descriptors per client, and what it then allows.

use std::fmt;
use std::io;

/// Descriptors kept for sluice itself: runtime, listeners, logs, health
/// checks, the state file.
const RESERVE: u64 = 64;
/// Idle pipes kept at most, whatever the limit.
const PIPES_MAX: u64 = 1024;

/// The limit on open descriptors, before and after raising it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    pub was: u64,
    pub now: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile() -> io::Result<Nofile> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let was = r.rlim_cur;
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    Ok(Nofile {
        was,
        now: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// What a descriptor limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: u64,
    /// Proxied clients at once, two descriptors each.
    pub clients: u64,
    /// Admin connections at once (from the config).
    pub admin: u64,
    /// Idle pipes kept for reuse (two descriptors each), at most an eighth
    /// of the room, so a burst of bulk flows cannot keep what clients need.
    pub pipes: usize,
}

impl Budget {
    pub fn of(limit: u64, admin_connections: usize) -> Budget {
        let admin = admin_connections as u64;
        let room = limit.saturating_sub(RESERVE + admin);
        Budget {
            limit,
            clients: room / 2,
            admin,
            pipes: (room / 16).min(PIPES_MAX) as usize,
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "limit {} open files: room for about {} proxied clients (two each), {} admin connections and {} idle pipes kept for reuse",
            self.limit, self.clients, self.admin, self.pipes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_splits_the_limit() {
        let b = Budget::of(1024, 32);
        assert_eq!(b.clients, (1024 - 64 - 32) / 2);
        assert_eq!(b.pipes, (1024 - 64 - 32) / 16);
        assert_eq!(Budget::of(1 << 20, 32).pipes, 1024);
        assert_eq!(Budget::of(10, 32).clients, 0);
    }

    #[test]
    fn raising_never_lowers() {
        let n = raise_nofile().unwrap();
        assert!(n.now >= n.was && n.now <= n.hard);
    }
}
