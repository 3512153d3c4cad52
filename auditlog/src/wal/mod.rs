//! The write-ahead log: CRC-framed segments in a local folder, written by one thread with group
//! commit, recovered on start, shipped to the lake and then deleted.

pub mod faults;
pub mod frame;
pub mod recovery;
pub mod segment;
pub mod state;
pub mod writer;
