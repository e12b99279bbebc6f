//! The bytes a TLS client sends before the handshake completes, kept for
//! its JA4 fingerprint: rustls parses the ClientHello but does not show
//! its raw extension list, so the stream under it keeps a copy of what it
//! reads (at most one full record) until the handshake is over.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use palisade_core::ja4::{MAX_RECORDED, ja4};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::TlsFingerprint;

/// A stream that copies the first [`MAX_RECORDED`] bytes read from it
/// until [`fingerprint`](Self::fingerprint) is asked; after that it only
/// passes bytes through.
pub struct Recorded<S> {
    inner: S,
    /// `None` once the fingerprint was taken.
    seen: Option<Vec<u8>>,
}

impl<S> Recorded<S> {
    /// Starts recording `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            // Grown as bytes arrive: a client that sends nothing costs nothing.
            seen: Some(Vec::new()),
        }
    }

    /// The JA4 of what was read so far, and the copy dropped; `None` when
    /// it is not a whole ClientHello (or was taken already).
    pub fn fingerprint(&mut self) -> Option<TlsFingerprint> {
        let seen = self.seen.take()?;
        ja4(&seen).ok().map(|fp| Arc::from(fp.as_str()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(seen) = &mut this.seen {
            let new = &buf.filled()[before..];
            let room = MAX_RECORDED.saturating_sub(seen.len());
            seen.extend_from_slice(&new[..new.len().min(room)]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn keeps_at_most_one_record_and_passes_everything() {
        let sent: Vec<u8> = (0..MAX_RECORDED + 1000).map(|i| i as u8).collect();
        let mut r = Recorded::new(&sent[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(r.seen.as_ref().map(Vec::len), Some(MAX_RECORDED));
        assert_eq!(r.fingerprint(), None, "not a hello");
        assert!(r.seen.is_none(), "the copy goes with the first ask");
    }
}
