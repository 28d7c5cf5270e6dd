//! Pen's client table (`client.c: store_client`): a fixed number of slots
//! remembering each client address's last server, so returning clients go
//! back to it. Same choices as Pen's linear scan, found in O(log n).

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use hashbrown::HashMap;

use super::min_tree::MinTree;

/// Who a client is, for tracking: its address without the port. All Unix
/// socket clients share one entry, as in Pen.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ClientKey {
    Ip(IpAddr),
    Unix,
}

/// One occupied slot, as `penctl clients` shows it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ClientEntry {
    pub slot: usize,
    pub key: ClientKey,
    /// When the client last connected, in the caller's seconds.
    pub last_secs: u64,
    /// The server it was last sent to, if any yet.
    pub server: Option<usize>,
    /// Connections since the slot was (re)assigned to this client.
    pub connects: u64,
    /// Bytes sent to the client (Pen's `csx`).
    pub sent: u64,
    /// Bytes received from the client (Pen's `crx`).
    pub received: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    key: Option<ClientKey>,
    last: u64,
    server: Option<usize>,
    connects: u64,
    sent: u64,
    received: u64,
}

/// Pen's client table: `capacity` slots, each holding one client address.
///
/// A new client takes the lowest-index slot that is unused or expired
/// (`tracking_secs > 0` and `last + tracking_secs < now`), else the slot
/// with the oldest `last`, ties to the lowest index, exactly as Pen's scan.
/// A returning client is found by address even in an expired slot: `-T`
/// frees slots for reuse, it does not forget affinity.
#[derive(Debug)]
pub struct ClientTable {
    slots: Vec<Slot>,
    by_key: HashMap<ClientKey, usize>,
    /// Per slot: 0 if unused, else `last + 1`. Unused and expired slots are
    /// then exactly those with a key at most `now - tracking_secs`, and the
    /// oldest slot the one with the smallest key.
    ages: MinTree,
    tracking_secs: u64,
}

const UNUSED: u64 = 0;

fn age(last: u64) -> u64 {
    last.saturating_add(1)
}

/// Room in the address index for a table of `slots`. Evictions leave
/// tombstones; hashbrown clears them in place (no allocation) only while the
/// entries fill at most half its capacity, so size it for twice the slots.
fn index_capacity(slots: usize) -> usize {
    2 * slots + 2
}

impl ClientTable {
    /// A table of `capacity` slots (at least 1); `tracking_secs` is `-T`,
    /// 0 meaning entries never expire.
    pub fn new(capacity: usize, tracking_secs: u64) -> Self {
        let capacity = capacity.max(1);
        ClientTable {
            slots: vec![Slot::default(); capacity],
            by_key: HashMap::with_capacity(index_capacity(capacity)),
            ages: MinTree::new(capacity, UNUSED),
            tracking_secs,
        }
    }

    /// Pen's `store_client` for a new connection at `now_secs`: the client's
    /// slot and the server it is tracked to (None for a new client).
    pub fn visit(&mut self, key: ClientKey, now_secs: u64) -> (usize, Option<usize>) {
        if let Some(&slot) = self.by_key.get(&key) {
            let entry = &mut self.slots[slot];
            entry.last = now_secs;
            entry.connects += 1;
            self.ages.set(slot, age(now_secs));
            return (slot, entry.server);
        }
        let slot = self.free_slot(now_secs);
        if let Some(old) = self.slots[slot].key {
            self.by_key.remove(&old);
        }
        self.slots[slot] = Slot {
            key: Some(key),
            last: now_secs,
            server: None,
            connects: 1,
            sent: 0,
            received: 0,
        };
        self.by_key.insert(key, slot);
        self.ages.set(slot, age(now_secs));
        (slot, None)
    }

    /// The slot a new client takes: the lowest-index unused or expired one,
    /// else the oldest.
    fn free_slot(&self, now_secs: u64) -> usize {
        // Expired: last + t < now, i.e. age = last + 1 <= now - t.
        let reusable = match self.tracking_secs {
            0 => UNUSED,
            t => now_secs.saturating_sub(t),
        };
        self.ages
            .first_at_most(reusable)
            .unwrap_or_else(|| self.ages.first_min())
    }

    /// Records that the client in `slot` was sent to `server`, if the slot
    /// still belongs to `key` (another client may have taken it meanwhile).
    /// Pen does this when the connect starts, so failover moves the client.
    pub fn track(&mut self, slot: usize, key: ClientKey, server: usize) {
        if let Some(entry) = self.owned(slot, key) {
            entry.server = Some(server);
        }
    }

    /// Adds a finished connection's traffic to the client in `slot`, if the
    /// slot still belongs to `key`.
    pub fn add_bytes(&mut self, slot: usize, key: ClientKey, to_client: u64, from_client: u64) {
        if let Some(entry) = self.owned(slot, key) {
            entry.sent = entry.sent.saturating_add(to_client);
            entry.received = entry.received.saturating_add(from_client);
        }
    }

    fn owned(&mut self, slot: usize, key: ClientKey) -> Option<&mut Slot> {
        self.slots.get_mut(slot).filter(|entry| entry.key == Some(key))
    }

    /// Raises the slot count to `capacity`; like Pen's `clients_max`, the
    /// table never shrinks, so a smaller value changes nothing.
    pub fn grow(&mut self, capacity: usize) {
        if capacity > self.slots.len() {
            drop(self.grow_into(ClientTable::room_for(capacity)));
        }
    }

    /// Storage for a table of `capacity` slots. Making it takes time in
    /// proportion to `capacity` (seconds for millions of slots), so it is
    /// made apart from the table the workers use, and [`grow_into`]
    /// (`Self::grow_into`) then takes time only in proportion to the
    /// clients already there.
    pub fn room_for(capacity: usize) -> Room {
        let capacity = capacity.max(1);
        Room {
            slots: vec![Slot::default(); capacity],
            by_key: HashMap::with_capacity(index_capacity(capacity)),
            ages: MinTree::new(capacity, UNUSED),
        }
    }

    /// Moves the table into `room` if that has more slots (see
    /// [`grow`](Self::grow)), and returns the storage no longer used, to be
    /// freed outside any lock.
    pub fn grow_into(&mut self, mut room: Room) -> Room {
        if room.slots.len() <= self.slots.len() {
            return room;
        }
        // A slot once taken stays taken, and one never taken is still at
        // its default, so the address index names every slot to carry over.
        for (&key, &slot) in &self.by_key {
            room.slots[slot] = self.slots[slot];
            room.by_key.insert(key, slot);
            room.ages.set(slot, age(self.slots[slot].last));
        }
        std::mem::swap(&mut self.slots, &mut room.slots);
        std::mem::swap(&mut self.by_key, &mut room.by_key);
        std::mem::swap(&mut self.ages, &mut room.ages);
        room
    }

    /// `tracking N` at run time: the expiry applies from the next visit.
    pub fn set_tracking_secs(&mut self, tracking_secs: u64) {
        self.tracking_secs = tracking_secs;
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The number of occupied slots.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no client has been seen yet.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The occupied slots, by index; found through the address index, so
    /// a big table with few clients is not scanned whole (under the lock
    /// the workers take).
    pub fn iter(&self) -> impl Iterator<Item = ClientEntry> + '_ {
        let mut occupied: Vec<usize> = self.by_key.values().copied().collect();
        occupied.sort_unstable();
        occupied.into_iter().filter_map(|slot| {
            let s = &self.slots[slot];
            s.key.map(|key| ClientEntry {
                slot,
                key,
                last_secs: s.last,
                server: s.server,
                connects: s.connects,
                sent: s.sent,
                received: s.received,
            })
        })
    }
}

/// A bigger table's storage, from [`ClientTable::room_for`].
pub struct Room {
    slots: Vec<Slot>,
    by_key: HashMap<ClientKey, usize>,
    ages: MinTree,
}

/// The client table shared by the workers: every access is short, so one
/// mutex serves.
#[derive(Debug)]
pub struct SharedClientTable(Mutex<ClientTable>);

impl SharedClientTable {
    pub fn new(table: ClientTable) -> Self {
        SharedClientTable(Mutex::new(table))
    }

    /// The table itself, for the rarer whole-table operations (listing,
    /// growing). A panic elsewhere while holding the lock cannot leave the
    /// table unsafe to use, only a stat or a tracking entry off, so a
    /// poisoned lock is taken over rather than spreading the panic.
    pub fn lock(&self) -> MutexGuard<'_, ClientTable> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`ClientTable::visit`].
    pub fn visit(&self, key: ClientKey, now_secs: u64) -> (usize, Option<usize>) {
        self.lock().visit(key, now_secs)
    }

    /// [`ClientTable::track`].
    pub fn track(&self, slot: usize, key: ClientKey, server: usize) {
        self.lock().track(slot, key, server);
    }

    /// [`ClientTable::add_bytes`].
    pub fn add_bytes(&self, slot: usize, key: ClientKey, to_client: u64, from_client: u64) {
        self.lock().add_bytes(slot, key, to_client, from_client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::select::{first_choice, Candidate, RoundRobin};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> ClientKey {
        ClientKey::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    fn v6(last: u16) -> ClientKey {
        ClientKey::Ip(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)))
    }

    /// Slot and tracked server for a visit, then tracks `server` as the
    /// caller would on starting the connect.
    fn connect(t: &mut ClientTable, key: ClientKey, now: u64, server: usize) -> (usize, Option<usize>) {
        let got = t.visit(key, now);
        t.track(got.0, key, server);
        got
    }

    #[test]
    fn pen_c3_example_round_robin_with_tracking() {
        // Verified on Debian's pen 0.34.1: -c 3, three servers, one second.
        let mut table = ClientTable::new(3, 0);
        let rr = RoundRobin::new();
        let servers = vec![
            Candidate {
                usable: true,
                ..Candidate::default()
            };
            3
        ];
        let mut serve = |last: u8| {
            let key = v4(last);
            let (slot, tracked) = table.visit(key, 100);
            let server = first_choice(&Mode::default(), &servers, key, 0, tracked, &rr).unwrap();
            table.track(slot, key, server);
            (slot, tracked, server)
        };
        assert_eq!(serve(2), (0, None, 1));
        assert_eq!(serve(3), (1, None, 2));
        assert_eq!(serve(4), (2, None, 0));
        assert_eq!(serve(5), (0, None, 1)); // evicts .2
        assert_eq!(serve(6), (0, None, 2)); // evicts .5: ties go to the lowest index
        assert_eq!(serve(2), (0, None, 0)); // .2 was forgotten
        assert_eq!(serve(3), (1, Some(2), 2)); // .3 kept its slot and server
    }

    #[test]
    fn returning_client_keeps_slot_and_server() {
        let mut t = ClientTable::new(4, 0);
        assert_eq!(connect(&mut t, v4(1), 10, 3), (0, None));
        assert_eq!(t.visit(v4(1), 11), (0, Some(3)));
        let e = t.iter().next().unwrap();
        assert_eq!(
            (e.key, e.last_secs, e.connects, e.server),
            (v4(1), 11, 2, Some(3))
        );
    }

    #[test]
    fn oldest_is_evicted_without_tracking_time() {
        let mut t = ClientTable::new(3, 0);
        t.visit(v4(1), 5);
        t.visit(v4(2), 3);
        t.visit(v4(3), 4);
        t.visit(v4(1), 1000); // refresh slot 0
        assert_eq!(t.visit(v4(4), 1001).0, 1);
        assert_eq!(t.visit(v4(5), 1002).0, 2);
        assert_eq!(t.visit(v4(6), 1003).0, 0);
    }

    #[test]
    fn expiry_keeps_affinity_until_the_slot_is_reused() {
        let mut t = ClientTable::new(2, 10);
        connect(&mut t, v4(1), 1, 2);
        assert_eq!(t.visit(v4(1), 50), (0, Some(2)));
        // Expired again, and now taken by another client.
        assert_eq!(t.visit(v4(2), 100).0, 0);
        assert_eq!(t.visit(v4(1), 101), (1, None));
    }

    #[test]
    fn expired_slot_is_reused_before_an_unused_one_with_a_higher_index() {
        let mut t = ClientTable::new(3, 10);
        t.visit(v4(1), 1);
        // 1 + 10 < 12: slot 0 has expired, and it comes before the unused 1 and 2.
        assert_eq!(t.visit(v4(2), 12), (0, None));
        // 12 + 10 < 22 is false: slot 0 is not expired at 22, so slot 1 is used.
        assert_eq!(t.visit(v4(3), 22).0, 1);
    }

    #[test]
    fn lowest_index_expired_slot_wins_over_the_oldest() {
        let mut t = ClientTable::new(3, 10);
        t.visit(v4(1), 1);
        t.visit(v4(2), 1);
        t.visit(v4(3), 1);
        t.visit(v4(1), 3); // slot 0: last 3
        t.visit(v4(2), 20); // slot 1: fresh
                            // Slots 0 (3 + 10 < 20) and 2 (1 + 10 < 20) have expired; 2 is older.
        assert_eq!(t.visit(v4(4), 20).0, 0);
        assert_eq!(t.visit(v4(5), 20).0, 2);
        // Nothing has expired now: the oldest (lowest index on ties) goes.
        assert_eq!(t.visit(v4(6), 20).0, 0);
    }

    #[test]
    fn expiry_is_strict() {
        let mut t = ClientTable::new(2, 10);
        t.visit(v4(1), 5);
        t.visit(v4(2), 6);
        // 5 + 10 < 15 is false: the oldest, slot 0, is evicted as a non-expired one.
        assert_eq!(t.visit(v4(3), 15).0, 0);
        // 6 + 10 < 17: slot 1 has expired.
        assert_eq!(t.visit(v4(4), 17).0, 1);
    }

    #[test]
    fn early_times_expire_nothing() {
        let mut t = ClientTable::new(2, 100);
        t.visit(v4(1), 0);
        t.visit(v4(2), 1);
        assert_eq!(t.visit(v4(3), 50).0, 0);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn reused_slot_starts_over() {
        let mut t = ClientTable::new(1, 0);
        connect(&mut t, v4(1), 1, 4);
        t.visit(v4(1), 2);
        t.add_bytes(0, v4(1), 100, 7);
        assert_eq!(t.visit(v4(2), 3), (0, None));
        let e = t.iter().next().unwrap();
        assert_eq!(
            (e.key, e.server, e.connects, e.sent, e.received),
            (v4(2), None, 1, 0, 0)
        );
    }

    #[test]
    fn track_and_add_bytes_ignore_a_slot_taken_by_another_client() {
        let mut t = ClientTable::new(1, 0);
        let (slot, _) = t.visit(v4(1), 1);
        t.visit(v4(2), 2);
        t.track(slot, v4(1), 3);
        t.add_bytes(slot, v4(1), 5, 5);
        t.track(99, v4(2), 3);
        let e = t.iter().next().unwrap();
        assert_eq!((e.key, e.server, e.sent), (v4(2), None, 0));
    }

    #[test]
    fn bytes_accumulate() {
        let mut t = ClientTable::new(2, 0);
        let (slot, _) = t.visit(v4(1), 1);
        t.add_bytes(slot, v4(1), 10, 1);
        t.add_bytes(slot, v4(1), 5, 2);
        let e = t.iter().next().unwrap();
        assert_eq!((e.sent, e.received), (15, 3));
    }

    #[test]
    fn grow_adds_unused_slots_and_never_shrinks() {
        let mut t = ClientTable::new(1, 0);
        connect(&mut t, v4(1), 1, 0);
        t.visit(v4(2), 2);
        t.grow(3);
        assert_eq!(t.capacity(), 3);
        assert_eq!(t.visit(v4(3), 3).0, 1);
        assert_eq!(t.visit(v4(4), 4).0, 2);
        assert_eq!(t.visit(v4(2), 5), (0, None));
        assert_eq!(t.len(), 3);
        t.grow(2);
        assert_eq!(t.capacity(), 3);
        assert_eq!(t.visit(v4(5), 6).0, 1);
    }

    #[test]
    fn unix_clients_share_one_entry() {
        let mut t = ClientTable::new(4, 0);
        connect(&mut t, ClientKey::Unix, 1, 2);
        assert_eq!(t.visit(ClientKey::Unix, 2), (0, Some(2)));
        assert_eq!(t.len(), 1);
        assert_eq!(t.iter().next().unwrap().connects, 2);
    }

    #[test]
    fn ipv6_clients_are_told_apart_by_the_whole_address() {
        let mut t = ClientTable::new(4, 0);
        connect(&mut t, v6(1), 1, 1);
        assert_eq!(t.visit(v6(0x101), 1), (1, None));
        assert_eq!(t.visit(v6(1), 2), (0, Some(1)));
        // ::1 and 127.0.0.1 are different clients.
        t.visit(ClientKey::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)), 3);
        t.visit(ClientKey::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), 3);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn zero_capacity_means_one_slot() {
        let mut t = ClientTable::new(0, 0);
        assert_eq!(t.capacity(), 1);
        assert!(t.is_empty());
        assert_eq!(t.visit(v4(1), 1), (0, None));
        assert_eq!(t.visit(v4(2), 1), (0, None));
    }

    #[test]
    fn a_full_table_churns_without_growing_its_index() {
        let mut t = ClientTable::new(64, 0);
        for i in 0..64u8 {
            t.visit(v4(i), 1);
        }
        let allocated = t.by_key.allocation_size();
        for i in 0..10_000u32 {
            let key = ClientKey::Ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
            t.visit(key, 2 + u64::from(i));
            assert_eq!(
                t.by_key.allocation_size(),
                allocated,
                "reallocated at eviction {i}"
            );
        }
        assert_eq!(t.len(), 64);
    }

    #[test]
    fn iter_lists_occupied_slots_in_order() {
        let mut t = ClientTable::new(4, 0);
        t.visit(v4(7), 1);
        t.visit(v4(8), 2);
        let keys: Vec<_> = t.iter().map(|e| (e.slot, e.key)).collect();
        assert_eq!(keys, [(0, v4(7)), (1, v4(8))]);
    }

    #[test]
    fn shared_table_survives_a_poisoned_lock() {
        let shared = std::sync::Arc::new(SharedClientTable::new(ClientTable::new(2, 0)));
        let (slot, _) = shared.visit(v4(1), 1);
        let poisoner = std::sync::Arc::clone(&shared);
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock();
            panic!("poison the lock");
        })
        .join();
        shared.track(slot, v4(1), 1);
        shared.add_bytes(slot, v4(1), 3, 4);
        assert_eq!(shared.visit(v4(1), 2), (0, Some(1)));
        assert_eq!(shared.lock().iter().next().unwrap().sent, 3);
    }
}
