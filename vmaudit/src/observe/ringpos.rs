//! The ring buffer's consumer and producer positions, read from their own mappings of the
//! map: whether events are pending, with no syscall and without consuming one (aya's reader
//! can only take them).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// Read-only mappings of a BPF ring buffer's two position pages.
pub struct RingPositions {
    consumer: NonNull<libc::c_void>,
    producer: NonNull<libc::c_void>,
    page: usize,
}

// SAFETY: the mappings are read through atomics only and unmapped once, in Drop.
unsafe impl Send for RingPositions {}

impl RingPositions {
    /// Maps the consumer page (offset 0) and the producer page (one page on) of ring buffer map
    /// `fd`, read-only.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map = |offset: usize| -> io::Result<NonNull<libc::c_void>> {
            // SAFETY: a fresh shared read-only mapping of one page of the map; the kernel
            // allows these two pages to be mapped read-only.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            NonNull::new(p).ok_or_else(io::Error::last_os_error)
        };
        let consumer = map(0)?;
        let producer = match map(page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: `consumer` was mapped above with this size and is not used after.
                unsafe { libc::munmap(consumer.as_ptr(), page) };
                return Err(e);
            }
        };
        Ok(Self {
            consumer,
            producer,
            page,
        })
    }

    fn load(p: NonNull<libc::c_void>) -> u64 {
        // SAFETY: the page is mapped for as long as `self` lives, starts with the 8-byte,
        // 8-aligned position the kernel updates atomically.
        unsafe { (*p.as_ptr().cast::<AtomicU64>()).load(Ordering::Acquire) }
    }

    /// Whether the producer has written past what the consumer took.
    pub fn pending(&self) -> bool {
        Self::load(self.producer) != Self::load(self.consumer)
    }
}

impl Drop for RingPositions {
    fn drop(&mut self) {
        // SAFETY: both pages were mapped in `new` with this size and nothing uses them now.
        unsafe {
            libc::munmap(self.consumer.as_ptr(), self.page);
            libc::munmap(self.producer.as_ptr(), self.page);
        }
    }
}
