//! The back-end request channel: the socket a front end hands over with SET_BACKEND_REQ_FD, on
//! which the back end sends messages of its own (here: the device configuration changed).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use thiserror::Error;

use super::wire::{backend_req, encode};

/// Why a message could not be sent on the back-end channel.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The socket refused the message.
    #[error(
        "cannot send {what} to the front end on its back-end channel: {source} (the front end \
         is gone, or does not read the channel)"
    )]
    Send {
        /// The message.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// The back-end request channel of one connection. Cheap to clone; valid while its front end
/// is connected (sending fails once it is gone).
#[derive(Debug, Clone)]
pub struct BackendChannel {
    sock: Arc<UnixStream>,
}

impl BackendChannel {
    pub(crate) fn new(sock: UnixStream) -> BackendChannel {
        BackendChannel {
            sock: Arc::new(sock),
        }
    }

    /// Tells the front end that the device configuration changed
    /// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), so it re-reads it and interrupts the guest.
    ///
    /// The message asks for no reply (nobody reads replies on this channel) and is sent without
    /// blocking: a front end that does not drain its channel costs an error, not a stuck caller.
    pub fn config_changed(&self) -> Result<(), ChannelError> {
        self.send(backend_req::CONFIG_CHANGE_MSG, "a config-change message")
    }

    fn send(&self, request: u32, what: &'static str) -> Result<(), ChannelError> {
        let msg = encode(request, 1, &[]);
        // SAFETY: `msg` is valid for reads of its length for the call; the socket is open
        // (owned by `self`); send(2) reads only `msg`.
        let n = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(n) if n == msg.len() => Ok(()),
            Ok(n) => Err(ChannelError::Send {
                what,
                source: io::Error::other(format!("only {n} of {} bytes went out", msg.len())),
            }),
            Err(_) => Err(ChannelError::Send {
                what,
                source: io::Error::last_os_error(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_config_change_is_one_header_without_need_reply() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let ch = BackendChannel::new(ours);
        ch.clone().config_changed().unwrap();
        let mut got = [0u8; 12];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, *encode(2, 1, &[]));
        drop(theirs);
        let e = ch.config_changed().unwrap_err();
        assert!(e.to_string().contains("the front end is gone"), "{e}");
    }
}
