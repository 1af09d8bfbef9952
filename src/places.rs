//! A listener's connection places. Every connection holds one for as long as it is open
//! (`proxy.max_connections`, the admin listener's 256), and a connection that has not yet
//! shown who it is — a stranger: no request yet on the proxy listener, no request with the
//! admin token on the admin one — is listed, oldest first. When every place is taken and
//! another connection knocks, the oldest stranger is closed to make room: clients without a
//! token cannot keep agents (or the operator) out by holding places open, however often they
//! reconnect, while connections that showed a token are never closed for this.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a connection just accepted is left to send its first head before it may be the
/// one to make room: a client sends it at once (it connected to send it), while clients that
/// reconnect as fast as they are closed would otherwise close every newcomer, agents' too,
/// before its head is read. It also bounds how fast newcomers get in while strangers hold
/// every place: a place every `GRACE`.
const GRACE: Duration = Duration::from_millis(100);

/// One listener's strangers, by arrival: when each came, and how to tell it to go.
#[derive(Default)]
pub struct Strangers {
    next: AtomicU64,
    waiting: Mutex<BTreeMap<u64, (Instant, Arc<Notify>)>>,
}

/// What `make_room` did.
enum Room {
    /// The oldest stranger was told to close.
    Made,
    /// The oldest stranger is still within its grace for this long.
    NotYet(Duration),
    /// There is no stranger: every place is held by a connection that showed who it is.
    NoStranger,
}

impl Strangers {
    /// Lists a connection just accepted, until it shows who it is (`Stranger::known`) or
    /// closes.
    pub fn arrive(self: &Arc<Self>) -> Stranger {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let kick = Arc::new(Notify::new());
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(id, (Instant::now(), kick.clone()));
        }
        Stranger {
            strangers: self.clone(),
            id,
            kick,
            known: AtomicBool::new(false),
        }
    }

    /// Tells the oldest stranger to close, once its grace is over.
    fn make_room(&self) -> Room {
        let Ok(mut waiting) = self.waiting.lock() else {
            return Room::NoStranger;
        };
        let Some(oldest) = waiting.first_entry() else {
            return Room::NoStranger;
        };
        let age = oldest.get().0.elapsed();
        if age < GRACE {
            return Room::NotYet(GRACE - age);
        }
        let (_, kick) = oldest.remove();
        // `notify_one` keeps the wake-up for a connection not waiting on it yet.
        kick.notify_one();
        Room::Made
    }

    fn remove(&self, id: u64) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&id);
        }
    }

    /// Connections listed now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.lock().map_or(0, |w| w.len())
    }
}

/// A connection's listing; dropping it takes the connection off the list.
pub struct Stranger {
    strangers: Arc<Strangers>,
    id: u64,
    kick: Arc<Notify>,
    known: AtomicBool,
}

impl Stranger {
    /// The connection showed who it is: off the list for good.
    pub fn known(&self) {
        if !self.known.swap(true, Ordering::AcqRel) {
            self.strangers.remove(self.id);
        }
    }

    /// Completes when the connection, still a stranger, is the one to make room; never once
    /// it is known.
    pub async fn crowded_out(&self) {
        loop {
            self.kick.notified().await;
            if !self.known.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        self.strangers.remove(self.id);
    }
}

/// A place for a connection just accepted: a free one, else, when every place is taken, the
/// one the oldest stranger gives up (or the next to free up when there is none). `None` once
/// the limit is closed.
pub async fn place_for(
    limit: &Arc<Semaphore>,
    strangers: &Strangers,
) -> Option<OwnedSemaphorePermit> {
    loop {
        if let Ok(place) = limit.clone().try_acquire_owned() {
            return Some(place);
        }
        let wait = match strangers.make_room() {
            // Its place comes as it closes; if it showed a token just as it was told (and so
            // stays), the next stranger is told after a grace.
            Room::Made => GRACE,
            Room::NotYet(left) => left,
            Room::NoStranger => return limit.clone().acquire_owned().await.ok(),
        };
        tokio::select! {
            place = limit.clone().acquire_owned() => return place.ok(),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// How many places a listener of `max_connections` can really give, under an open-files
/// limit of `limit` (`None`: unlimited): two descriptors a connection (the agent's, and an
/// upstream's) and 512 for the rest, as `keyward serve` warns at start. Past the limit
/// `accept` fails before any place is full, and no stranger gives its place up: clients
/// without a token would keep agents out until `header_read_timeout`.
pub fn fitting(max_connections: usize, limit: Option<u64>) -> usize {
    let Some(limit) = limit else {
        return max_connections;
    };
    let room = limit.saturating_sub(SPARE_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION;
    max_connections.min(usize::try_from(room).unwrap_or(usize::MAX).max(1))
}

/// The open-files limit `max_connections` needs: the inverse of `fitting`.
pub fn descriptors_needed(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(DESCRIPTORS_PER_CONNECTION)
        .saturating_add(SPARE_DESCRIPTORS)
}

/// An agent's descriptor and an upstream's.
const DESCRIPTORS_PER_CONNECTION: u64 = 2;
/// The admin listener, pooled upstream connections, the audit log, the CA files.
const SPARE_DESCRIPTORS: u64 = 512;

/// `fitting` under this process's open-files limit.
pub fn fitting_open_files(max_connections: usize) -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    fitting(max_connections, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn places_fit_under_the_open_files_limit() {
        assert_eq!(fitting(4096, None), 4096);
        assert_eq!(fitting(4096, Some(1 << 20)), 4096);
        // Two descriptors a connection, 512 for the rest.
        assert_eq!(fitting(4096, Some(8704)), 4096);
        assert_eq!(fitting(4096, Some(1024)), 256);
        assert_eq!(fitting(4096, Some(256)), 1, "at least one place");
        // The limit `keyward serve` asks for fits them all, and one less does not.
        let needed = descriptors_needed(4096);
        assert_eq!(needed, 8704);
        assert_eq!(fitting(4096, Some(needed)), 4096);
        assert_eq!(fitting(4096, Some(needed - 2)), 4095);
    }

    async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_full_listener_closes_its_oldest_stranger_for_a_newcomer() {
        let limit = Arc::new(Semaphore::new(2));
        let strangers = Arc::new(Strangers::default());
        // Two connections hold both places: the first still a stranger, the second known.
        let first = place_for(&limit, &strangers).await.unwrap();
        let first_stranger = strangers.arrive();
        let arrived = Instant::now();
        let second = place_for(&limit, &strangers).await.unwrap();
        let second_stranger = strangers.arrive();
        second_stranger.known();
        assert_eq!(strangers.len(), 1);

        let newcomer = |limit: &Arc<Semaphore>, strangers: &Arc<Strangers>| {
            let (limit, strangers) = (limit.clone(), strangers.clone());
            tokio::spawn(async move { place_for(&limit, &strangers).await })
        };
        let third = newcomer(&limit, &strangers);
        // The stranger is told to close once its grace is over (not before: it may be an
        // agent whose head is on its way); its place goes to the newcomer once it has.
        bounded(first_stranger.crowded_out()).await;
        assert!(arrived.elapsed() >= GRACE, "told within its grace");
        assert_eq!(strangers.len(), 0);
        assert!(!third.is_finished());
        drop((first, first_stranger));
        let third = bounded(third).await.unwrap();
        assert!(third.is_some());

        // A known connection is not told, and with no stranger left a newcomer waits for a
        // place to free up.
        let fourth = newcomer(&limit, &strangers);
        let told = tokio::time::timeout(Duration::from_millis(100), second_stranger.crowded_out());
        assert!(
            told.await.is_err(),
            "a known connection was told to make room"
        );
        assert!(!fourth.is_finished());
        drop(second);
        assert!(bounded(fourth).await.unwrap().is_some());
    }
}
