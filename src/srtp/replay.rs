//! The sliding replay window of RFC 3711 §3.3.2.

use super::SrtpError;

/// Packets this far behind the newest one are still accepted once (libsrtp
/// and most phones use 64 or 128).
pub const REPLAY_WINDOW: u64 = 128;

/// Which of the last [`REPLAY_WINDOW`] indices were received.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplayWindow {
    /// The highest index accepted, valid once `started`.
    top: u64,
    /// Bit `n` set: index `top - n` was received.
    seen: u128,
    started: bool,
}

impl ReplayWindow {
    /// Whether `index` may be accepted; checked before authentication,
    /// recorded with [`accept`](Self::accept) only after it.
    pub(crate) fn check(&self, index: u64) -> Result<(), SrtpError> {
        if !self.started || index > self.top {
            return Ok(());
        }
        let behind = self.top - index;
        if behind >= REPLAY_WINDOW {
            Err(SrtpError::TooOld)
        } else if self.seen >> behind & 1 == 1 {
            Err(SrtpError::Replayed)
        } else {
            Ok(())
        }
    }

    /// A window in which `top` and everything before it counts as seen.
    pub(crate) fn closed_up_to(top: u64) -> Self {
        ReplayWindow {
            top,
            seen: u128::MAX,
            started: true,
        }
    }

    pub(crate) fn top(&self) -> Option<u64> {
        self.started.then_some(self.top)
    }

    pub(crate) fn accept(&mut self, index: u64) {
        if !self.started {
            *self = ReplayWindow {
                top: index,
                seen: 1,
                started: true,
            };
        } else if index > self.top {
            let ahead = index - self.top;
            self.seen = if ahead >= REPLAY_WINDOW {
                0
            } else {
                self.seen << ahead
            };
            self.seen |= 1;
            self.top = index;
        } else {
            self.seen |= 1 << (self.top - index);
        }
    }
}
