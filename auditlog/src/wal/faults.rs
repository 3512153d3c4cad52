//! Fault injection for the WAL: make the next writes, fsyncs or segment creations fail, the way a
//! full disk (`ENOSPC`), a dying disk (`EIO`) or a file-size limit (`EFBIG`) would.
//!
//! Every [`crate::AuditLog`] has one ([`crate::AuditLog::wal_faults`]); nothing arms it but a
//! test. The writer asks it before each write, fsync and segment creation, so a test can drive
//! the exact failure paths the invariants of [`crate::wal::writer`] speak about, in-process and
//! without root. Unarmed, each check is one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Which operation fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Appending frames to the active segment fails with `ENOSPC`.
    Write,
    /// `fdatasync` of the active segment fails with `EIO`.
    Fsync,
    /// Creating a new segment fails with `EFBIG` (as under a file-size limit).
    CreateSegment,
}

/// Armed faults: how many of the next operations of each kind fail (`u32::MAX`: until cleared).
#[derive(Debug, Default)]
pub struct WalFaults {
    write: AtomicU32,
    fsync: AtomicU32,
    create: AtomicU32,
    /// While set, the WAL thread waits before each write (a stalled disk or writer).
    stall: AtomicBool,
    /// Set while the WAL thread is waiting in a stall.
    stalled: AtomicBool,
}

/// The value that keeps a fault armed until [`WalFaults::clear`].
pub const UNTIL_CLEARED: u32 = u32::MAX;

impl WalFaults {
    fn counter(&self, fault: Fault) -> &AtomicU32 {
        match fault {
            Fault::Write => &self.write,
            Fault::Fsync => &self.fsync,
            Fault::CreateSegment => &self.create,
        }
    }

    /// Makes the next `times` operations of this kind fail ([`UNTIL_CLEARED`] for all of them).
    pub fn fail(&self, fault: Fault, times: u32) {
        self.counter(fault).store(times, Ordering::SeqCst);
    }

    /// Stalls the WAL thread before its next write until [`WalFaults::resume_writes`] (a disk
    /// that stops answering): records pile up in the queue to the writer.
    pub fn stall_writes(&self) {
        self.stall.store(true, Ordering::SeqCst);
    }

    /// Lets a stalled WAL thread go on.
    pub fn resume_writes(&self) {
        self.stall.store(false, Ordering::SeqCst);
    }

    /// Whether the WAL thread is waiting in a stall right now.
    pub fn writer_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        for fault in [Fault::Write, Fault::Fsync, Fault::CreateSegment] {
            self.counter(fault).store(0, Ordering::SeqCst);
        }
        self.resume_writes();
    }

    /// The error this operation fails with, if a fault is armed for it (consuming one).
    pub(crate) fn take(&self, fault: Fault) -> Option<std::io::Error> {
        if fault == Fault::Write && self.stall.load(Ordering::SeqCst) {
            self.stalled.store(true, Ordering::SeqCst);
            while self.stall.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.stalled.store(false, Ordering::SeqCst);
        }
        let counter = self.counter(fault);
        let armed = counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                UNTIL_CLEARED => Some(UNTIL_CLEARED),
                n => Some(n - 1),
            })
            .is_ok();
        armed.then(|| {
            std::io::Error::from_raw_os_error(match fault {
                Fault::Write => 28,         // ENOSPC
                Fault::Fsync => 5,          // EIO
                Fault::CreateSegment => 27, // EFBIG
            })
        })
    }
}
