//! The TCP send path: whole data frames with vectored, non-signalling
//! `sendmsg` calls on the runtime, blocking sends for the control writer
//! thread, and the synchronous abort of a connection.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use crate::net::SendHalf;

impl SendHalf for OwnedWriteHalf {
    fn send_frame(
        &mut self,
        header: &[u8],
        payload: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send {
        let stream: &TcpStream = (*self).as_ref();
        send_frame(stream, header, payload)
    }

    fn abort(&mut self) {
        // SAFETY: the fd belongs to the stream this half keeps alive (we
        // hold the half), so it is open; shutdown neither closes nor
        // invalidates it.
        unsafe {
            libc::shutdown(self.as_ref().as_raw_fd(), libc::SHUT_RDWR);
        }
    }

    fn send_blocking(
        &mut self,
        mut buf: &[u8],
        step: Duration,
        give_up: &dyn Fn() -> bool,
    ) -> io::Result<bool> {
        // The socket is non-blocking because the runtime reads it: wait for
        // writability in between.
        let stream: &TcpStream = self.as_ref();
        let sock = socket2::SockRef::from(stream);
        while !buf.is_empty() {
            match sock.send_with_flags(buf, libc::MSG_NOSIGNAL) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if give_up() {
                        return Ok(false);
                    }
                    wait_writable(stream.as_raw_fd(), step);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

fn wait_writable(fd: RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, initialized pollfd that outlives the call,
    // and nfds is 1; `fd` is open (the write half is owned by the caller).
    unsafe {
        libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int);
    }
}

/// Writes header and payload with as few `sendmsg` calls as the socket
/// allows (one, normally), so a frame leaves as one stream of segments
/// instead of a lone header segment and then the payload. `MSG_NOSIGNAL`,
/// unlike a plain `writev`, never raises SIGPIPE, which would kill C host
/// programs that do not ignore it.
async fn send_frame(stream: &TcpStream, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let total = header.len() + payload.len();
    let mut done = 0;
    while done < total {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg_from(fd, header, payload, done)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One non-blocking `sendmsg` of what is left of `header ++ payload` after
/// the first `done` bytes.
fn sendmsg_from(fd: RawFd, header: &[u8], payload: &[u8], done: usize) -> io::Result<usize> {
    let parts: [&[u8]; 2] = if done < header.len() {
        [&header[done..], payload]
    } else {
        [&payload[done - header.len()..], &[]]
    };
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 2];
    let mut n = 0;
    for part in parts.iter().filter(|p| !p.is_empty()) {
        iov[n] = libc::iovec {
            iov_base: part.as_ptr() as *mut libc::c_void,
            iov_len: part.len(),
        };
        n += 1;
    }
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n as _;
    // SAFETY: `fd` is the open socket of the stream the caller holds; the
    // iovecs point into live slices that sendmsg only reads.
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
