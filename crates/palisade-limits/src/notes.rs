//! The recent events behind reputation scores, for explanations.
//!
//! Only clients whose score something changed have notes, so they live
//! beside the client records, not in them: a fixed array of slots, picked
//! by a seeded hash of the key, each holding one client's last four
//! events. A client whose slot was taken by another client's newer event
//! keeps its score (that is in its record) but loses the explanation.
//! Penalties are rare next to requests, so a slot is a small mutex.

use std::hash::BuildHasher;
use std::sync::Mutex;

use palisade_core::ClientKey;

use crate::reputation::Event;

/// Events kept per client.
pub const EVENTS: usize = 4;

#[derive(Default)]
struct Note {
    key: Option<ClientKey>,
    /// Where the next event goes.
    next: usize,
    events: [Option<Event>; EVENTS],
}

/// A bounded side table of recent events per client.
pub struct Notes {
    slots: Box<[Mutex<Note>]>,
    hasher: foldhash::fast::RandomState,
}

impl Notes {
    /// Room for the events of `clients` clients (at least 1).
    pub fn new(clients: usize) -> Self {
        Self {
            slots: (0..clients.max(1)).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn slot(&self, key: &ClientKey) -> std::sync::MutexGuard<'_, Note> {
        let i = (self.hasher.hash_one(key) % self.slots.len() as u64) as usize;
        // A panic while holding a slot cannot leave a note half-written in
        // a way that matters: take it anyway.
        self.slots[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an event of `key`, replacing another client's notes if they
    /// shared the slot.
    pub fn record(&self, key: &ClientKey, event: Event) {
        let mut note = self.slot(key);
        if note.key != Some(*key) {
            *note = Note {
                key: Some(*key),
                ..Note::default()
            };
        }
        let i = note.next % EVENTS;
        note.events[i] = Some(event);
        note.next = note.next.wrapping_add(1);
    }

    /// The client's recent events, newest first.
    pub fn events(&self, key: &ClientKey) -> Vec<Event> {
        let note = self.slot(key);
        if note.key != Some(*key) {
            return Vec::new();
        }
        (1..=EVENTS)
            .filter_map(|back| note.events[(note.next + EVENTS * 2 - back) % EVENTS])
            .collect()
    }

    /// Forgets the client's events.
    pub fn forget(&self, key: &ClientKey) {
        let mut note = self.slot(key);
        if note.key == Some(*key) {
            *note = Note::default();
        }
    }

    /// Clients the table has room for.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reputation::EventKind;

    fn ev(at: u64) -> Event {
        Event {
            at,
            kind: EventKind::External,
            delta: -1,
            score_after: 50,
        }
    }

    #[test]
    fn keeps_the_last_four_newest_first() {
        let n = Notes::new(64);
        let k = ClientKey::V4(1);
        for at in 0..6 {
            n.record(&k, ev(at));
        }
        let at: Vec<_> = n.events(&k).iter().map(|e| e.at).collect();
        assert_eq!(at, [5, 4, 3, 2]);
        assert!(n.events(&ClientKey::V4(2)).is_empty());
        n.forget(&k);
        assert!(n.events(&k).is_empty());
    }

    #[test]
    fn a_shared_slot_goes_to_the_newest_client() {
        let n = Notes::new(1);
        n.record(&ClientKey::V4(1), ev(1));
        n.record(&ClientKey::V4(2), ev(2));
        assert!(n.events(&ClientKey::V4(1)).is_empty());
        assert_eq!(n.events(&ClientKey::V4(2)).len(), 1);
    }
}
