//! The state file: every backend's admin state, and whether this instance
//! is leaving its pair, so that a backend drained for maintenance stays
//! drained, and a host that left stays out, when sluice restarts.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::State;

/// Admin states by backend name.
pub type States = HashMap<String, State>;

/// What the state file keeps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub backends: States,
    /// Set by `POST /leave` until `POST /join`.
    #[serde(default)]
    pub leaving: bool,
}

/// The file as it is written, or as versions before `leave` wrote it (a
/// bare map of states).
#[derive(Deserialize)]
#[serde(untagged)]
enum OnDisk {
    Current(Saved),
    Bare(States),
}

/// Reads a state file; none yet is empty. The error says what to do.
pub fn load(path: &Path) -> Result<Saved, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(OnDisk::Current(s)) => Ok(s),
            Ok(OnDisk::Bare(backends)) => Ok(Saved {
                backends,
                leaving: false,
            }),
            Err(e) => Err(format!(
                "{e}; fix it, or delete it to start with every backend active"
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes `saved` to `path`, atomically.
pub fn save(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(saved).map_err(std::io::Error::other)?;
    // Named by the process: during an upgrade two processes may write,
    // and neither may rename the other's half-written file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all((text + "\n").as_bytes())?;
        // On disk before the rename, so a power cut leaves the old file
        // or the new one, never a torn one.
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(load(&path).unwrap(), Saved::default());
        let saved = Saved {
            backends: [("web1".to_string(), State::Stopped)].into(),
            leaving: true,
        };
        save(&path, &saved).unwrap();
        assert_eq!(load(&path).unwrap(), saved);
        std::fs::write(&path, "{").unwrap();
        assert!(load(&path).unwrap_err().contains("delete it"));
    }

    #[test]
    fn a_file_of_an_earlier_version_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, r#"{"web1": "drained", "web2": "active"}"#).unwrap();
        let saved = load(&path).unwrap();
        assert_eq!(saved.backends["web1"], State::Drained);
        assert!(!saved.leaving);
    }
}
