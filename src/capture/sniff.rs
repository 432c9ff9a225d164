//! A packet socket bound to one link (the primary's tap): every frame to and from the guest
//! is copied to it by the kernel; nothing is in the frames' path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::CaptureError;

/// Largest frame read: a tap may hand over 64 KiB GSO frames.
pub const MAX_FRAME: usize = 65_536 + 64;

/// A bound `AF_PACKET` socket.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    link: String,
}

impl PacketSocket {
    /// Opens a socket receiving every frame of `link`; a read waits at most `timeout`.
    pub fn open(link: &str, timeout: Duration) -> Result<Self, CaptureError> {
        let fail = |what| {
            let source = io::Error::last_os_error();
            move || CaptureError::Socket {
                link: link.to_string(),
                what,
                source,
            }
        };
        let name = std::ffi::CString::new(link).map_err(|_| CaptureError::Socket {
            link: link.to_string(),
            what: "name",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(fail("if_nametoindex")());
        }
        // Protocol 0: the socket receives nothing until it is bound to the link with
        // ETH_P_ALL, so no frame of another link is ever queued on it.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(fail("socket")());
        }
        // SAFETY: `raw` is a new, valid descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: the pointer and length describe `sll`, which lives across the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(fail("bind")());
        }
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: the pointer and length describe `tv`, which lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(fail("SO_RCVTIMEO")());
        }
        let size: libc::c_int = 4 << 20;
        // SAFETY: the pointer and length describe `size`, which lives across the call. A
        // smaller buffer than asked for is not an error (the kernel caps it).
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        Ok(Self {
            fd,
            link: link.to_string(),
        })
    }

    /// The link it is bound to.
    pub fn link(&self) -> &str {
        &self.link
    }

    /// Reads one frame into `buf`: Ok(Some(len)), Ok(None) when the wait timed out. A frame
    /// longer than `buf` is cut to it.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.recv_from(buf)?.map(|(n, _)| n))
    }

    /// Like [`Self::recv`], but a frame this host sent out of the link (for a bridge port: one
    /// the bridge forwarded to it) is read and dropped, Ok(None): only frames that came in from
    /// the link's far side are returned.
    pub fn recv_incoming(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self
            .recv_from(buf)?
            .and_then(|(n, kind)| (kind != libc::PACKET_OUTGOING).then_some(n)))
    }

    /// One frame and its packet type (`sll_pkttype`).
    fn recv_from(&self, buf: &mut [u8]) -> io::Result<Option<(usize, u8)>> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is writable for its length and `from`/`len` describe a sockaddr_ll,
        // all of which live across the call.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n >= 0 {
            return Ok(Some((n as usize, from.sll_pkttype)));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(None)
            }
            _ => Err(e),
        }
    }
}
