//! Running sessions' cancel keys: the target's own, which never leave the
//! agent; a client's verified CancelRequest is sent to the target with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gatehouse_agent_core::config::TargetConfig;

use crate::upstream;

/// Where to send a cancel for one session.
#[derive(Clone)]
pub struct CancelTarget {
    pub target: TargetConfig,
    pub key: upstream::UpstreamKey,
}

/// Running sessions' cancel keys, by session id.
#[derive(Clone, Default)]
pub struct CancelKeys(Arc<Mutex<HashMap<String, CancelTarget>>>);

/// Removes a session's key when the session ends.
pub struct CancelKeyGuard {
    keys: CancelKeys,
    session_id: String,
}

impl CancelKeys {
    pub fn register(&self, session_id: String, t: CancelTarget) -> CancelKeyGuard {
        if let Ok(mut m) = self.0.lock() {
            m.insert(session_id.clone(), t);
        }
        CancelKeyGuard {
            keys: self.clone(),
            session_id,
        }
    }

    pub fn get(&self, session_id: &str) -> Option<CancelTarget> {
        self.0.lock().ok()?.get(session_id).cloned()
    }
}

impl Drop for CancelKeyGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.keys.0.lock() {
            m.remove(&self.session_id);
        }
    }
}
