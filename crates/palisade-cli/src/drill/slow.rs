//! Slow clients: a request head sent one byte at a time and never
//! finished (slowloris), and request bodies that trickle far below the
//! daemon's minimum rate. Each connection is timed from its first byte to
//! the daemon's cut; one still open well past the daemon's deadline is a
//! breach, and so is a slow body the upstream still holds by then.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use palisade_proxy::config::{Config, Overrides};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;

use super::attack::{Attack, BoxFuture, Budget, Ctx, Layer, Outcome};
use super::{upstream, wire};

/// What `--quick` shortens the daemon's slow-client deadlines to, so that
/// an attack waits them out within seconds.
pub const QUICK_DEADLINE: &str = "2s";

/// The `[server]` deadlines the slow attacks wait out.
const DEADLINES: [&str; 3] = ["header_read_timeout", "body_rate_grace", "write_timeout"];

/// Under `--quick`: `text` (a rewritten config) with each of
/// [`DEADLINES`] that the config leaves at its default set to
/// [`QUICK_DEADLINE`], and the keys it set. A deadline the user chose is
/// theirs to drill: it stays, and an attack that cannot wait it out in
/// its seconds says so and is skipped.
pub fn quicken(text: &str, overrides: &Overrides) -> anyhow::Result<(String, Vec<&'static str>)> {
    let parse = |t: &str| Config::parse(t, "drill config", overrides).map_err(|e| anyhow::anyhow!("{e}"));
    let theirs = parse(text)?.server;
    let defaults = parse("")?.server;
    let kept = |key: &str| match key {
        "header_read_timeout" => theirs.header_read_timeout == defaults.header_read_timeout,
        "body_rate_grace" => theirs.body_rate_grace == defaults.body_rate_grace,
        _ => theirs.write_timeout == defaults.write_timeout,
    };
    let shortened: Vec<&'static str> = DEADLINES.into_iter().filter(|k| kept(k)).collect();
    if shortened.is_empty() {
        return Ok((text.to_owned(), shortened));
    }
    let mut doc: toml::Table = text.parse().context("the config is not valid TOML")?;
    let server = doc
        .entry("server")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(server) = server.as_table_mut() {
        for key in &shortened {
            server.insert((*key).to_owned(), toml::Value::String(QUICK_DEADLINE.to_owned()));
        }
    }
    Ok((
        toml::to_string(&doc).context("writing the drill's config")?,
        shortened,
    ))
}

/// How long past `deadline` a slow connection may live before it counts
/// as having outlived it: timer and scheduling slack, not a second chance.
pub(super) fn outlived(deadline: Duration) -> Duration {
    deadline + (deadline / 2).max(Duration::from_secs(1))
}

/// Time given to opening an attack's connections.
pub(super) const SPREAD: Duration = Duration::from_secs(1);

/// Why a slow attack cannot wait out `deadline` (named `key`) within
/// `budget`, if it cannot.
pub(super) fn too_long(key: &str, deadline: Duration, budget: Budget) -> Option<String> {
    (SPREAD + outlived(deadline) > budget.seconds).then(|| {
        format!(
            "server.{key} is {} s: this attack ({} s) cannot wait it out{}",
            deadline.as_secs_f64(),
            budget.seconds.as_secs(),
            if budget.seconds < Duration::from_secs(10) {
                " (run without --quick)"
            } else {
                ""
            }
        )
    })
}

/// How a slow connection ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum End {
    /// The daemon answered (with this status) or closed, this long after
    /// the connection's first byte.
    Cut { after: Duration, status: Option<u16> },
    /// Still open at the bound.
    Survived,
    /// It never got connected; `refused` when the daemon reset it.
    NotConnected { refused: bool },
}

/// Connection ends, summed up into an outcome.
pub(super) fn tally(ends: &[(Duration, End)], what: &str, key: &str, deadline: Duration) -> Outcome {
    let mut o = Outcome::default();
    let (mut closed, mut survived, mut refused, mut failed) = (0, 0, 0, 0);
    let mut answered = std::collections::BTreeMap::<u16, u32>::new();
    let mut longest = Duration::ZERO;
    for &(at, end) in ends {
        match end {
            End::Cut { after, status } => {
                o.refused_at(at, Layer::Http);
                longest = longest.max(after);
                match status {
                    Some(s) => *answered.entry(s).or_default() += 1,
                    None => closed += 1,
                }
            }
            End::Survived => survived += 1,
            End::NotConnected { refused: true } => {
                o.refused_at(at, Layer::Accept);
                refused += 1;
            }
            End::NotConnected { refused: false } => failed += 1,
        }
    }
    o.sent = ends.len() as u64;
    let answered: Vec<String> = answered
        .iter()
        .map(|(s, n)| format!("{n} answered {s}"))
        .collect();
    o.notes.push(format!(
        "{} {what}: {}{closed} closed by the daemon (the longest {:.1} s \
         after its start; server.{key} is {} s), {refused} reset at accept, {failed} not connected",
        ends.len(),
        answered.iter().map(|a| format!("{a}, ")).collect::<String>(),
        longest.as_secs_f64(),
        deadline.as_secs_f64()
    ));
    if survived > 0 {
        o.breaches.push(format!(
            "{survived} {what} were still open {:.1} s after their start \
             (server.{key} is {} s)",
            outlived(deadline).as_secs_f64(),
            deadline.as_secs_f64()
        ));
    }
    o
}

/// Waits for the daemon to end the connection: the status it answered
/// with, if any.
async fn ended(rd: &mut OwnedReadHalf) -> Option<u16> {
    let mut buf = [0u8; 1024];
    match rd.read(&mut buf).await {
        Ok(n) if n > 0 => std::str::from_utf8(&buf[..n])
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok(),
        _ => None,
    }
}

/// A request head that never ends: `Host` and then headers, forever.
fn endless_head(i: usize) -> u8 {
    const START: &[u8] = b"GET / HTTP/1.1\r\nHost: drill.test\r\nUser-Agent: palisade-drill\r\n";
    const MORE: &[u8] = b"X-Drill-Slow: aaaaaaaa\r\n";
    START
        .get(i)
        .copied()
        .unwrap_or_else(|| MORE[(i - START.len()) % MORE.len()])
}

/// One slow connection from `from`: `head` at once, then `piece(i)`
/// every `every`, until the daemon cuts it or `bound` after the head.
async fn slow_conn(
    ctx: &Ctx,
    from: Ipv4Addr,
    head: &[u8],
    piece: impl Fn(usize) -> Vec<u8>,
    every: Duration,
    bound: Duration,
) -> End {
    let stream = match wire::connect(from, ctx.target).await {
        Ok(s) => s,
        Err(e) => {
            return End::NotConnected {
                refused: wire::is_refusal(&e),
            };
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let first = Instant::now();
    let trickle = async {
        if wr.write_all(head).await.is_err() {
            return;
        }
        for i in 0.. {
            if wr.write_all(&piece(i)).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
    };
    tokio::select! {
        status = ended(&mut rd) => End::Cut { after: first.elapsed(), status },
        // A failed write means the daemon closed: its answer may still be
        // there to read.
        () = trickle => {
            let status = tokio::time::timeout(Duration::from_millis(200), ended(&mut rd))
                .await
                .ok()
                .flatten();
            End::Cut { after: first.elapsed(), status }
        }
        () = tokio::time::sleep(bound) => End::Survived,
    }
}

/// Runs `conn` for `ctx.budget.max` connections opened over [`SPREAD`],
/// each from the next source: when each ended, since the attack started.
pub(super) async fn spread<F, Fut>(ctx: &Ctx, conn: F) -> Vec<(Duration, End)>
where
    F: Fn(Ctx, Ipv4Addr) -> Fut,
    Fut: Future<Output = End> + Send + 'static,
{
    let start = Instant::now();
    let n = ctx.budget.max.max(1);
    let gap = SPREAD / u32::try_from(n).unwrap_or(u32::MAX);
    let mut tasks = Vec::new();
    for i in 0..n {
        let from = ctx.sources[i as usize % ctx.sources.len()];
        let fut = conn(ctx.clone(), from);
        tasks.push(tokio::spawn(async move {
            let end = fut.await;
            (start.elapsed(), end)
        }));
        tokio::time::sleep(gap).await;
    }
    let mut ends = Vec::new();
    for t in tasks {
        if let Ok(e) = t.await {
            ends.push(e);
        }
    }
    ends
}

/// Slowloris: many connections, each sending its request head a byte at
/// a time and never finishing it.
pub struct Slowloris;

impl Attack for Slowloris {
    fn name(&self) -> &'static str {
        "slowloris"
    }
    fn title(&self) -> &'static str {
        "slowloris: connections from 64 addresses sending a request head a byte at a time, never finishing it"
    }
    fn sources(&self) -> u32 {
        64
    }
    fn budget(&self, quick: bool) -> Budget {
        if quick {
            Budget {
                max: 256,
                seconds: Duration::from_secs(5),
            }
        } else {
            Budget {
                max: 1024,
                seconds: Duration::from_secs(15),
            }
        }
    }
    fn skip(&self, ctx: &Ctx) -> Option<String> {
        too_long(
            "header_read_timeout",
            ctx.defenses.header_read_timeout,
            ctx.budget,
        )
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let deadline = ctx.defenses.header_read_timeout;
            // Faster than the deadline, so a daemon that restarted it at
            // every byte would never cut.
            let every = (deadline / 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
            let bound = outlived(deadline);
            let ends = spread(&ctx, move |ctx, from| async move {
                slow_conn(&ctx, from, &[], |i| vec![endless_head(i)], every, bound).await
            })
            .await;
            Ok(tally(
                &ends,
                "slowloris connections",
                "header_read_timeout",
                deadline,
            ))
        })
    }
}

/// The length slow-body requests announce: far more than they send,
/// under the default `server.max_body_size` (a smaller one answers 413 at
/// once, which the notes show).
const BODY_LEN: u64 = 1 << 20;

/// Slow request bodies: a large Content-Length, then the body a few bytes
/// at a time, far below `server.body_min_rate`.
pub struct SlowBody;

impl Attack for SlowBody {
    fn name(&self) -> &'static str {
        "slow-body"
    }
    fn title(&self) -> &'static str {
        "slow request bodies: POSTs from 32 addresses announcing 1 MiB, sent at an eighth of server.body_min_rate"
    }
    fn sources(&self) -> u32 {
        32
    }
    fn budget(&self, quick: bool) -> Budget {
        if quick {
            Budget {
                max: 64,
                seconds: Duration::from_secs(5),
            }
        } else {
            Budget {
                max: 256,
                seconds: Duration::from_secs(15),
            }
        }
    }
    fn skip(&self, ctx: &Ctx) -> Option<String> {
        if ctx.defenses.body_min_rate == 0 {
            return Some(
                "server.body_min_rate is 0: slow bodies are only bounded by body_read_timeout".into(),
            );
        }
        too_long("body_rate_grace", ctx.defenses.body_rate_grace, ctx.budget)
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let start = Instant::now();
            let grace = ctx.defenses.body_rate_grace;
            let bound = outlived(grace);
            let every = Duration::from_millis(250);
            // An eighth of the rate, in four pieces a second.
            let piece = usize::try_from((ctx.defenses.body_min_rate / 32).max(1)).unwrap_or(1);
            let head = format!(
                "POST /slow-body HTTP/1.1\r\nHost: drill.test\r\nUser-Agent: palisade-drill\r\n\
                 Content-Type: application/octet-stream\r\nContent-Length: {BODY_LEN}\r\n\r\n"
            );
            let before = upstream::held(&ctx, "post").await?;
            let peak = Arc::new(AtomicU64::new(0));
            let sampler = {
                let (ctx, peak) = (ctx.clone(), peak.clone());
                tokio::spawn(async move {
                    loop {
                        if let Ok(h) = upstream::held(&ctx, "post").await {
                            peak.fetch_max(h.in_flight.saturating_sub(before.in_flight), Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            };
            let head = Arc::new(head.into_bytes());
            let ends = spread(&ctx, move |ctx, from| {
                let head = head.clone();
                async move { slow_conn(&ctx, from, &head, |_| vec![b'x'; piece], every, bound).await }
            })
            .await;
            sampler.abort();
            let mut outcome = tally(&ends, "slow-body connections", "body_rate_grace", grace);
            // Every request's bound is over by then: the upstream must
            // have let go of all of them.
            let due = start + SPREAD + bound;
            let after = loop {
                let h = upstream::held(&ctx, "post").await?;
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
                    "the upstream still held {held} slow-body requests {:.1} s after the last one started \
                     (server.body_rate_grace is {} s)",
                    bound.as_secs_f64(),
                    grace.as_secs_f64()
                ));
            }
            Ok(outcome)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides() -> Overrides {
        Overrides {
            upstreams: vec!["http://127.0.0.1:8081".into()],
            ..Overrides::default()
        }
    }

    #[test]
    fn quick_shortens_only_the_deadlines_left_at_their_defaults() {
        let text = "[server]\nheader_read_timeout = \"5s\"\nwrite_timeout = \"30s\"\n";
        let (out, keys) = quicken(text, &overrides()).unwrap();
        assert_eq!(keys, ["header_read_timeout", "body_rate_grace"]);
        let c = Config::parse(&out, "t", &overrides()).unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.server.body_rate_grace, Duration::from_secs(2));
        assert_eq!(c.server.write_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_deadline_the_attack_cannot_wait_out_is_a_skip() {
        let quick = Slowloris.budget(true);
        assert!(too_long("header_read_timeout", Duration::from_secs(2), quick).is_none());
        let why = too_long("header_read_timeout", Duration::from_secs(5), quick).unwrap();
        assert!(why.contains("server.header_read_timeout is 5 s"), "{why}");
        assert!(
            too_long(
                "header_read_timeout",
                Duration::from_secs(5),
                Slowloris.budget(false)
            )
            .is_none()
        );
    }

    /// With the defaults, a full drill runs every slow attack, and a quick
    /// one too once its deadlines are shortened.
    #[test]
    fn every_budget_waits_out_the_deadline_it_drills() {
        let d = Config::parse("", "t", &overrides()).unwrap().server;
        let quick = Duration::from_secs(2);
        let stall = super::super::http2::Stall;
        for (key, deadline, attack) in [
            (
                "header_read_timeout",
                d.header_read_timeout,
                &Slowloris as &dyn Attack,
            ),
            ("body_rate_grace", d.body_rate_grace, &SlowBody),
            ("write_timeout", d.write_timeout, &stall),
        ] {
            assert_eq!(too_long(key, deadline, attack.budget(false)), None);
            assert_eq!(too_long(key, quick, attack.budget(true)), None);
        }
    }

    #[test]
    fn a_connection_the_daemon_left_open_is_a_breach() {
        let d = Duration::from_secs(2);
        let cut = End::Cut {
            after: Duration::from_millis(2100),
            status: Some(408),
        };
        let ok = tally(
            &[(Duration::from_secs(2), cut)],
            "slowloris connections",
            "header_read_timeout",
            d,
        );
        assert!(ok.breaches.is_empty(), "{:?}", ok.breaches);
        assert_eq!(ok.refused.map(|(_, l)| l), Some(Layer::Http));
        let bad = tally(
            &[
                (Duration::from_secs(2), cut),
                (Duration::from_secs(3), End::Survived),
            ],
            "slowloris connections",
            "header_read_timeout",
            d,
        );
        assert_eq!(
            bad.breaches,
            [
                "1 slowloris connections were still open 3.0 s after their start (server.header_read_timeout is 2 s)"
            ]
        );
    }

    #[test]
    fn the_head_never_ends() {
        let head: Vec<u8> = (0..4096).map(endless_head).collect();
        assert!(head.starts_with(b"GET / HTTP/1.1\r\nHost: drill.test\r\n"));
        assert!(!head.windows(4).any(|w| w == b"\r\n\r\n"));
    }
}
