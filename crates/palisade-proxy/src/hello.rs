//! The JA4 of a TLS client's ClientHello, read from the bytes rustls reads:
//! rustls parses the hello but does not show its raw extension list, so
//! the stream under it hands what it reads to a [`HelloReader`] until the
//! hello is whole. The reader keeps at most the hello
//! ([`MAX_HELLO`](palisade_core::ja4::MAX_HELLO),
//! usually nothing: a hello in one read is fingerprinted where it lies)
//! and drops it as soon as it has an answer, so a connection that stalls
//! mid-handshake holds a fingerprint, not a copy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use palisade_core::ja4::{HelloReader, Ja4Error};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::TlsFingerprint;

/// A stream that reads its first bytes as a ClientHello for its JA4, then
/// only passes bytes through.
pub struct Recorded<S> {
    inner: S,
    /// `None` once the hello had an answer (or the answer was taken).
    reader: Option<HelloReader>,
    /// The hello's answer, until [`fingerprint`](Self::fingerprint) takes it.
    answer: Option<Result<TlsFingerprint, Ja4Error>>,
}

impl<S> Recorded<S> {
    /// Starts reading `inner`'s ClientHello.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            reader: Some(HelloReader::new()),
            answer: None,
        }
    }

    /// The JA4 of the ClientHello read; `None` when it was not a whole
    /// ClientHello (or was taken already). Reading stops here either way.
    pub fn fingerprint(&mut self) -> Option<TlsFingerprint> {
        self.reader = None;
        self.answer.take()?.ok()
    }

    /// Bytes held for the hello now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.reader.as_ref().map_or(0, HelloReader::kept)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(reader) = &mut this.reader
            && let Some(answer) = reader.feed(&buf.filled()[before..])
        {
            this.answer = Some(answer);
            this.reader = None;
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
    use palisade_core::ja4::ja4;
    use tokio::io::AsyncReadExt;

    const CHROMIUM: &[u8] = include_bytes!("../../palisade-core/testdata/chromium148-hello.bin");

    /// Hands out its bytes `step` at a time, as a slow network would.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.step.min(self.bytes.len()).min(buf.remaining());
            let (head, rest) = self.bytes.split_at(n);
            buf.put_slice(head);
            self.bytes = rest;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_hello_in_one_read_is_fingerprinted_and_everything_passes() {
        let mut sent = CHROMIUM.to_vec();
        sent.extend([23, 3, 3, 0, 3, 1, 2, 3]);
        let mut r = Recorded::new(&sent[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(r.kept(), 0, "nothing copied");
        let expected = ja4(CHROMIUM).unwrap();
        assert_eq!(r.fingerprint().map(|f| f.ja4), Some(expected));
        assert_eq!(r.fingerprint(), None, "taken");
    }

    #[tokio::test]
    async fn a_trickled_hello_is_kept_only_until_it_is_whole() {
        let mut r = Recorded::new(Trickle {
            bytes: CHROMIUM,
            step: 1,
        });
        let mut byte = [0u8; 1];
        let mut most = 0;
        for _ in 0..CHROMIUM.len() {
            r.read_exact(&mut byte).await.unwrap();
            most = most.max(r.kept());
        }
        assert!(most <= CHROMIUM.len(), "{most} bytes kept at most");
        assert_eq!(r.kept(), 0, "dropped with the answer");
        assert_eq!(r.fingerprint().map(|f| f.ja4), Some(ja4(CHROMIUM).unwrap()));
    }

    #[tokio::test]
    async fn what_is_not_a_hello_is_dropped_at_once() {
        let sent = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        let mut r = Recorded::new(&sent[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert!(r.reader.is_none() && r.kept() == 0);
        assert_eq!(r.fingerprint(), None);
    }

    #[tokio::test]
    async fn an_endless_hello_holds_at_most_max_hello() {
        use palisade_core::ja4::MAX_HELLO;
        // A hello declaring 16 MiB, and one declaring the most there may
        // be; then endless handshake records. The first is refused from its
        // header; the second is kept while it arrives, never past
        // MAX_HELLO, and dropped once whole.
        let most = MAX_HELLO - 4;
        for head in [
            [1, 0xff, 0xff, 0xff],
            [1, (most >> 16) as u8, (most >> 8) as u8, most as u8],
        ] {
            let mut sent = vec![22, 3, 1, 0, 4];
            sent.extend(head);
            let filler = [22, 3, 1, 0x40, 0]
                .into_iter()
                .chain(std::iter::repeat_n(0xff, 0x4000));
            sent.extend(filler.cycle().take(1 << 20));
            let mut r = Recorded::new(Trickle {
                bytes: &sent,
                step: 4096,
            });
            let mut buf = vec![0u8; 4096];
            while r.read(&mut buf).await.unwrap() > 0 {
                assert!(r.kept() <= MAX_HELLO, "{} kept", r.kept());
            }
            assert!(r.reader.is_none() && r.kept() == 0);
            assert_eq!(r.fingerprint(), None);
        }
    }
}
