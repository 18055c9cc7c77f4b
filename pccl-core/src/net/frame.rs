//! Framing shared by every transport: the greeting each connection starts
//! with and the length-prefixed control frames, over any ordered byte
//! stream (`AsyncRead`/`AsyncWrite`). The bytes are [`crate::wire`]'s.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{check_control_len, Hello, WireError};

/// Errors of framed I/O.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("malformed: {0}")]
    Wire(#[from] WireError),
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    TimedOut,
}

/// Reads a greeting within `timeout`.
pub async fn read_hello<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Hello, FrameError> {
    let mut b = [0u8; Hello::LEN];
    match tokio::time::timeout(timeout, r.read_exact(&mut b)).await {
        Err(_) => Err(FrameError::TimedOut),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) => Ok(Hello::decode(&b)?),
    }
}

pub async fn write_hello<W: AsyncWrite + Unpin>(w: &mut W, h: &Hello) -> io::Result<()> {
    w.write_all(&h.encode()).await
}

/// Reads one control frame body (type + payload). A clean EOF between frames
/// is [`FrameError::Closed`].
pub async fn read_control_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let n = check_control_len(u32::from_le_bytes(len))?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    Ok(body)
}
