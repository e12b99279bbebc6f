//! Upstream connections, capped per upstream.
//!
//! The pool bounds only idle connections; busy ones grow with the requests
//! in flight, so clients that hold responses could open as many upstream
//! connections as they have streams. [`CappedConnector`] counts the open
//! connections of each upstream authority (a slot rides inside the
//! connection and is given back when it closes) and refuses a new one at
//! the cap at once: the request is answered 503, it never waits.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Uri;
use http::uri::Authority;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Every upstream connection is in use and the cap is reached.
#[derive(Debug, thiserror::Error)]
#[error("upstream connection limit ({0}) reached")]
pub struct AtCapacity(pub usize);

/// An [`HttpConnector`] with at most `max` open connections per authority.
#[derive(Clone)]
pub struct CappedConnector {
    inner: HttpConnector,
    max: usize,
    open: Arc<Mutex<HashMap<Authority, Arc<AtomicUsize>>>>,
}

impl CappedConnector {
    /// Wraps `inner`, allowing `max` connections to each authority.
    pub fn new(inner: HttpConnector, max: usize) -> Self {
        Self {
            inner,
            max,
            open: Arc::default(),
        }
    }

    fn slot(&self, uri: &Uri) -> Result<Slot, AtCapacity> {
        // Only configured upstreams are ever asked for, so the map stays
        // as small as the upstream list.
        let count = match uri.authority() {
            Some(a) => self
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(a.clone())
                .or_default()
                .clone(),
            None => Arc::default(),
        };
        if count.fetch_add(1, Ordering::AcqRel) >= self.max {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(AtCapacity(self.max));
        }
        Ok(Slot(count))
    }
}

/// One place under the cap, given back on drop.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<Uri> for CappedConnector {
    type Response = CappedConn;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Boxed<Result<CappedConn, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let slot = self.slot(&uri);
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let slot = slot?;
            let io = connecting.await?;
            Ok(CappedConn { io, slot })
        })
    }
}

/// An upstream connection holding its place under the cap.
pub struct CappedConn {
    io: TokioIo<TcpStream>,
    slot: Slot,
}

impl CappedConn {
    /// The socket and its place under the cap (a tunnel keeps both).
    pub fn into_parts(self) -> (TcpStream, Slot) {
        (self.io.into_inner(), self.slot)
    }
}

impl Connection for CappedConn {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for CappedConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for CappedConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
