//! The event plane: KV events from every instance, tagged with the instance that sent
//! them. The embedded [`LocalEventPlane`] is a bounded broadcast; a distributed one (NATS:
//! a subject per model) implements the same trait.
//!
//! Delivery is best effort by design: a subscriber that falls behind loses events, and
//! the per-instance event ids (consecutive, see `protocol::kv`) tell it which instance to
//! resynchronise from a snapshot. Nothing blocks the engines on a slow router.

use std::sync::Arc;

use protocol::KvEvent;
use tokio::sync::broadcast;

use crate::InstanceId;

/// Consecutive events of one instance, in id order.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceEvents {
    pub instance: InstanceId,
    pub events: Vec<KvEvent>,
}

pub trait EventPlane: Send + Sync + 'static {
    fn publish(&self, batch: InstanceEvents);
    /// Every batch published after this call. `Lagged` on the receiver means batches were
    /// lost: the subscriber should treat every instance as possibly out of date.
    fn subscribe(&self) -> broadcast::Receiver<Arc<InstanceEvents>>;
}

pub struct LocalEventPlane {
    tx: broadcast::Sender<Arc<InstanceEvents>>,
}

impl LocalEventPlane {
    /// `capacity` batches are buffered for the slowest subscriber.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        LocalEventPlane { tx }
    }

    /// Publishes every KV event of an in-process engine as `instance`, batching what has
    /// queued up, until the engine's event channel closes. Runs on the current runtime.
    pub fn forward(
        self: &Arc<Self>,
        instance: InstanceId,
        mut rx: broadcast::Receiver<KvEvent>,
    ) -> tokio::task::JoinHandle<()> {
        let plane = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let first = match rx.recv().await {
                    Ok(ev) => ev,
                    // Lost events show up downstream as a jump in ids.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let mut events = vec![first];
                while events.len() < 256 {
                    match rx.try_recv() {
                        Ok(ev) => events.push(ev),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    }
                }
                plane.publish(InstanceEvents { instance, events });
            }
        })
    }
}

impl EventPlane for LocalEventPlane {
    fn publish(&self, batch: InstanceEvents) {
        // No subscriber is not an error: nobody routes yet.
        let _ = self.tx.send(Arc::new(batch));
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<InstanceEvents>> {
        self.tx.subscribe()
    }
}
