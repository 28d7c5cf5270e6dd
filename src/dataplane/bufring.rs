//! A provided buffer ring (`IORING_REGISTER_PBUF_RING`): the worker's pool of
//! receive buffers. The kernel picks a buffer only when data arrives, so an
//! idle connection holds none; a buffer comes back to the ring once the send
//! that forwarded its bytes has completed.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::Submitter;

/// An anonymous private mapping, unmapped on drop. Pages are only backed
/// by memory once touched, so unused buffers cost address space, not RSS.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The ring of buffer descriptors and the buffers themselves.
pub struct BufRing {
    /// Page-aligned array of `entries` descriptors shared with the kernel.
    ring: Mapping,
    buffers: Mapping,
    entries: u16,
    buf_size: u32,
    group: u16,
    /// Bytes at the end of each buffer the kernel never fills.
    reserve: u32,
    /// Our copy of the tail; the kernel reads the one inside the ring.
    tail: u16,
    /// Buffers currently in the ring (not lent out).
    available: u32,
}

impl BufRing {
    /// Allocates `entries` (a power of two) buffers of `buf_size` bytes and
    /// registers them with the ring as group `group`. The kernel is told each
    /// buffer is `reserve` bytes shorter, so a receive always leaves that much
    /// room at the end (the `-H` header insert). Capping the receive length
    /// per submission instead is refused by kernels before 6.17.
    pub fn register(
        submitter: &Submitter<'_>,
        group: u16,
        entries: u16,
        buf_size: u32,
        reserve: u32,
    ) -> io::Result<Self> {
        assert!(
            entries.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let ring = Mapping::new(entries as usize * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(entries as usize * buf_size as usize)?;
        let mut this = BufRing {
            ring,
            buffers,
            entries,
            buf_size,
            group,
            reserve,
            tail: 0,
            available: 0,
        };
        // SAFETY: the ring mapping is page-aligned, sized for `entries`
        // descriptors, and lives in `this`; every owner declares its io_uring
        // before this field, so the ring (and with it the registration) is
        // dropped before the mapping is unmapped.
        unsafe {
            submitter.register_buf_ring_with_flags(this.ring.ptr.as_ptr() as u64, entries, group, 0)?;
        }
        for bid in 0..entries {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Bytes at the end of each buffer that receives leave free.
    pub fn reserve(&self) -> u32 {
        self.reserve
    }

    /// Buffers the kernel can still pick.
    pub fn available(&self) -> u32 {
        self.available
    }

    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// The start of buffer `bid`.
    pub fn ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.entries);
        // SAFETY: bid < entries, so the offset stays inside the mapping.
        unsafe {
            self.buffers
                .ptr
                .as_ptr()
                .add(bid as usize * self.buf_size as usize)
        }
    }

    /// The first `len` bytes of buffer `bid`, as filled by a receive.
    pub fn bytes(&self, bid: u16, len: u32) -> &[u8] {
        let len = len.min(self.buf_size) as usize;
        // SAFETY: in bounds (see `ptr`); the kernel wrote these bytes before
        // posting the CQE that lent us the buffer, and it will not touch the
        // buffer again until we give it back.
        unsafe { std::slice::from_raw_parts(self.ptr(bid), len) }
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn release(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    /// Called when a CQE lent us a buffer.
    pub fn lent(&mut self) {
        self.available = self.available.saturating_sub(1);
    }

    fn push(&mut self, bid: u16) {
        let mask = self.entries - 1;
        let index = (self.tail & mask) as usize;
        // SAFETY: index < entries; the kernel only reads descriptors between
        // its head and the published tail, and this slot is past the tail.
        let entry = unsafe { &mut *self.ring.ptr.as_ptr().cast::<BufRingEntry>().add(index) };
        entry.set_addr(self.ptr(bid) as u64);
        entry.set_len(self.buf_size - self.reserve);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.available += 1;
    }

    fn publish(&self) {
        let base = self.ring.ptr.as_ptr().cast::<BufRingEntry>();
        // SAFETY: the tail field lives inside the first descriptor of our
        // mapping; the kernel reads it with acquire semantics, so a release
        // store makes the descriptors written before it visible.
        unsafe {
            let tail = BufRingEntry::tail(base) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}
