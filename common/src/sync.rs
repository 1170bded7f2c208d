//! Small synchronisation helpers shared by the daemons.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, carrying on if a thread panicked while holding it: the daemons' locked state
/// stays consistent across such a panic (counters, queues, device state), and a backend must
/// keep serving rather than cascade the panic to every thread.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
