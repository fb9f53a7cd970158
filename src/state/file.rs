//! The state file: every backend's admin state, so that a backend drained
//! for maintenance stays drained when sluice restarts.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use crate::backend::State;

/// Admin states by backend name.
pub type Saved = HashMap<String, State>;

/// Reads a state file; none yet is empty. The error says what to do.
pub fn load(path: &Path) -> Result<Saved, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| format!("{e}; fix it, or delete it to start with every backend active")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes admin states to `path`, atomically.
pub fn save(path: &Path, states: &Saved) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(states).map_err(std::io::Error::other)?;
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
        assert!(load(&path).unwrap().is_empty());
        save(&path, &[("web1".to_string(), State::Stopped)].into()).unwrap();
        assert_eq!(load(&path).unwrap()["web1"], State::Stopped);
        std::fs::write(&path, "{").unwrap();
        assert!(load(&path).unwrap_err().contains("delete it"));
    }
}
