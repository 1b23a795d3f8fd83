//! Discovery: the registry of live instances.
//!
//! An instance registers an [`InstanceInfo`] with a client to reach it; watchers get the
//! current set and then every change, in order. The embedded [`LocalDiscovery`] lives in
//! the process that started the instances. A distributed registry (etcd: a key per
//! instance under a lease, a watch on the prefix) implements the same trait; the client it
//! hands out is then a network client built from the instance's address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::requests::InstanceClient;
use crate::InstanceId;

/// What an instance does in a (possibly disaggregated) deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Prefill and decode (aggregated serving).
    #[default]
    Both,
    Prefill,
    Decode,
}

/// An instance's identity, as the router and the orchestrator see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: InstanceId,
    /// The model it serves (the served name).
    pub model: String,
    pub role: Role,
    /// Tokens per KV block: the router hashes prompts with the same block size.
    pub block_size: usize,
    /// Blocks in its KV cache.
    pub kv_blocks: usize,
    /// "cpu", "cuda:0", "mock", ...
    pub device: String,
    /// Tensor-parallel ranks behind this instance.
    pub tensor_parallel: usize,
}

/// A change in the set of instances.
#[derive(Clone)]
pub enum DiscoveryEvent {
    Added(InstanceInfo, Arc<dyn InstanceClient>),
    Removed(InstanceId),
}

impl std::fmt::Debug for DiscoveryEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiscoveryEvent::Added(info, _) => f.debug_tuple("Added").field(info).finish(),
            DiscoveryEvent::Removed(id) => f.debug_tuple("Removed").field(id).finish(),
        }
    }
}

/// A registered instance and the client that reaches it.
pub type Entry = (InstanceInfo, Arc<dyn InstanceClient>);

pub trait Discovery: Send + Sync + 'static {
    /// Announces an instance. Registering an id again replaces the earlier entry.
    fn register(&self, info: InstanceInfo, client: Arc<dyn InstanceClient>);
    /// Takes an instance out (drained, stopped or found dead). Unknown ids are ignored.
    fn deregister(&self, id: InstanceId);
    /// The instances registered now.
    fn list(&self) -> Vec<Entry>;
    /// The current set and a receiver of every change after it, with no change lost
    /// between the two. A receiver that falls more than the channel's capacity behind
    /// sees `Lagged` and should call `watch` again.
    fn watch(&self) -> (Vec<Entry>, broadcast::Receiver<DiscoveryEvent>);
}

/// The in-process registry.
pub struct LocalDiscovery {
    // One lock over the map and the sender keeps `watch`'s snapshot and stream consistent.
    inner: Mutex<(
        BTreeMap<InstanceId, Entry>,
        broadcast::Sender<DiscoveryEvent>,
    )>,
}

impl Default for LocalDiscovery {
    fn default() -> Self {
        LocalDiscovery::new()
    }
}

impl LocalDiscovery {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        LocalDiscovery {
            inner: Mutex::new((BTreeMap::new(), tx)),
        }
    }
}

impl Discovery for LocalDiscovery {
    fn register(&self, info: InstanceInfo, client: Arc<dyn InstanceClient>) {
        let mut g = self.inner.lock().expect("discovery lock");
        let (map, tx) = &mut *g;
        if map.contains_key(&info.id) {
            let _ = tx.send(DiscoveryEvent::Removed(info.id));
        }
        map.insert(info.id, (info.clone(), Arc::clone(&client)));
        let _ = tx.send(DiscoveryEvent::Added(info, client));
    }

    fn deregister(&self, id: InstanceId) {
        let mut g = self.inner.lock().expect("discovery lock");
        let (map, tx) = &mut *g;
        if map.remove(&id).is_some() {
            let _ = tx.send(DiscoveryEvent::Removed(id));
        }
    }

    fn list(&self) -> Vec<Entry> {
        let g = self.inner.lock().expect("discovery lock");
        g.0.values().cloned().collect()
    }

    fn watch(&self) -> (Vec<Entry>, broadcast::Receiver<DiscoveryEvent>) {
        let g = self.inner.lock().expect("discovery lock");
        (g.0.values().cloned().collect(), g.1.subscribe())
    }
}
