//! A simulated disk that keeps written and durable bytes apart.
//!
//! redb writes through [`DiskBackend`]; `sync_data` makes what was written
//! durable. [`Disk::crash`] throws away everything written since the last
//! sync and cuts off the backend that was in use (a dropped database cannot
//! flush anything afterwards): the next [`Disk::backend`] starts from the
//! durable bytes, as a machine does after power loss.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct State {
    /// The bytes as the running process sees them.
    live: Vec<u8>,
    /// The bytes that survive a crash.
    durable: Vec<u8>,
    /// Writes since the last sync: (offset, bytes), plus a length change.
    unsynced: Vec<(usize, Vec<u8>)>,
    unsynced_len: Option<usize>,
    /// Backends of older incarnations are cut off.
    incarnation: u64,
}

/// One node's disk.
#[derive(Debug, Clone, Default)]
pub struct Disk(Arc<Mutex<State>>);

impl Disk {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A backend for a new open of the store.
    pub fn backend(&self) -> DiskBackend {
        DiskBackend {
            disk: self.clone(),
            incarnation: self.lock().incarnation,
        }
    }

    /// Power loss: unsynced writes are gone, the running backend is cut off.
    pub fn crash(&self) {
        let mut state = self.lock();
        state.incarnation += 1;
        state.live = state.durable.clone();
        state.unsynced.clear();
        state.unsynced_len = None;
    }
}

/// The backend redb writes through.
#[derive(Debug)]
pub struct DiskBackend {
    disk: Disk,
    incarnation: u64,
}

impl DiskBackend {
    /// The disk's state, if this backend has not been cut off by a crash.
    fn state(&self) -> Result<MutexGuard<'_, State>, io::Error> {
        let state = self.disk.lock();
        if state.incarnation != self.incarnation {
            return Err(io::Error::other("the machine crashed"));
        }
        Ok(state)
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset out of range")
}

impl redb::StorageBackend for DiskBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.state()?.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let state = self.state()?;
        let offset = usize::try_from(offset).map_err(|_| out_of_range())?;
        let source = state
            .live
            .get(offset..offset + out.len())
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut state = self.state()?;
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        state.live.resize(len, 0);
        // A shrink drops what earlier unsynced writes put beyond it.
        state.unsynced.retain(|(o, _)| *o < len);
        for (offset, bytes) in &mut state.unsynced {
            bytes.truncate(len - *offset);
        }
        state.unsynced_len = Some(len);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut state = self.state()?;
        let state = &mut *state;
        if let Some(len) = state.unsynced_len.take() {
            state.durable.resize(len, 0);
        }
        for (offset, bytes) in state.unsynced.drain(..) {
            let end = (offset + bytes.len()).min(state.durable.len());
            if offset < end {
                state.durable[offset..end].copy_from_slice(&bytes[..end - offset]);
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut state = self.state()?;
        let offset = usize::try_from(offset).map_err(|_| out_of_range())?;
        let target = state
            .live
            .get_mut(offset..offset + data.len())
            .ok_or_else(out_of_range)?;
        target.copy_from_slice(data);
        state.unsynced.push((offset, data.to_vec()));
        Ok(())
    }
}
