//! A TCP worker's receive buffers: the provided buffer ring the kernel picks
//! from, plus spare buffers lent for one receive at a time when the ring has
//! run dry. Peers that do not read can pin ring buffers (at most a few per
//! connection); spares keep every other connection moving, and cost memory
//! only while they are in use.

use std::io;

use io_uring::Submitter;

use super::bufring::BufRing;
use super::proxy::BufId;

/// Spares kept allocated for reuse after they come back; the rest are freed.
const SPARES_KEPT: usize = 8;

pub struct Buffers {
    ring: BufRing,
    /// Spare `i` has id `ring.entries() + i`; `None` once freed.
    spares: Vec<Option<Box<[u8]>>>,
    /// Spares back from use that kept their memory.
    idle: Vec<usize>,
    /// Slots whose memory was freed.
    vacant: Vec<usize>,
}

impl Buffers {
    /// `count` ring buffers of `size` bytes, of which receives fill at most
    /// `size - reserve` (the room `-H` needs).
    pub fn new(
        submitter: &Submitter<'_>,
        group: u16,
        count: u16,
        size: u32,
        reserve: u32,
    ) -> io::Result<Self> {
        Ok(Buffers {
            ring: BufRing::register(submitter, group, count, size, reserve)?,
            spares: Vec::new(),
            idle: Vec::new(),
            vacant: Vec::new(),
        })
    }

    /// The ring's buffer group, for buffer-select receives.
    pub fn group(&self) -> u16 {
        self.ring.group()
    }

    /// Bytes one receive may fill.
    pub fn recv_len(&self) -> u32 {
        self.ring.buf_size() - self.ring.reserve()
    }

    /// Every buffer's whole size, reserve included.
    pub fn size(&self) -> u32 {
        self.ring.buf_size()
    }

    /// A completion lent us ring buffer `bid`.
    pub fn lent(&mut self, bid: u16) -> BufId {
        self.ring.lent();
        BufId::from(bid)
    }

    /// Lends a spare buffer for one receive.
    pub fn take_spare(&mut self) -> BufId {
        let index = self.idle.pop().unwrap_or_else(|| {
            let memory = Some(vec![0; self.ring.buf_size() as usize].into_boxed_slice());
            match self.vacant.pop() {
                Some(i) => {
                    self.spares[i] = memory;
                    i
                }
                None => {
                    self.spares.push(memory);
                    self.spares.len() - 1
                }
            }
        });
        u32::from(self.ring.entries()) + index as u32
    }

    /// Spares lent out right now.
    #[cfg(test)]
    fn spares_in_use(&self) -> usize {
        self.spares.len() - self.idle.len() - self.vacant.len()
    }

    /// The start of buffer `bid`.
    pub fn ptr(&mut self, bid: BufId) -> *mut u8 {
        match self.spare_index(bid) {
            None => self.ring.ptr(bid as u16),
            Some(i) => self.spares[i]
                .as_mut()
                .expect("a lent spare holds its memory")
                .as_mut_ptr(),
        }
    }

    /// The first `len` bytes of buffer `bid`, as filled by a receive.
    pub fn bytes(&self, bid: BufId, len: u32) -> &[u8] {
        match self.spare_index(bid) {
            None => self.ring.bytes(bid as u16, len),
            Some(i) => {
                let spare = self.spares[i].as_deref().expect("a lent spare holds its memory");
                &spare[..(len as usize).min(spare.len())]
            }
        }
    }

    /// Gives buffer `bid` back: to the kernel, or to the spares.
    pub fn release(&mut self, bid: BufId) {
        match self.spare_index(bid) {
            None => self.ring.release(bid as u16),
            Some(i) if self.idle.len() < SPARES_KEPT => self.idle.push(i),
            Some(i) => {
                self.spares[i] = None;
                self.vacant.push(i);
            }
        }
    }

    fn spare_index(&self, bid: BufId) -> Option<usize> {
        bid.checked_sub(u32::from(self.ring.entries()))
            .map(|i| i as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_live_outside_the_ring_and_only_a_few_are_kept() {
        let ring = io_uring::IoUring::new(8).expect("io_uring");
        let mut bufs = Buffers::new(&ring.submitter(), 7, 4, 4096, 0).expect("buffer ring");
        let lent: Vec<BufId> = (0..SPARES_KEPT + 3).map(|_| bufs.take_spare()).collect();
        assert!(lent.iter().all(|&b| b >= 4), "spare ids follow the ring's");
        assert_eq!(bufs.spares_in_use(), lent.len());
        // SAFETY: the spare is lent to this test and holds 4096 bytes.
        unsafe { *bufs.ptr(lent[0]) = 42 };
        assert_eq!(bufs.bytes(lent[0], 1), &[42]);
        for &b in &lent {
            bufs.release(b);
        }
        assert_eq!(bufs.spares_in_use(), 0);
        assert_eq!(bufs.spares.iter().filter(|s| s.is_some()).count(), SPARES_KEPT);
        // A kept spare is reused before a freed slot is refilled.
        let again = bufs.take_spare();
        assert!(bufs.spares[(again - 4) as usize].is_some());
    }
}
