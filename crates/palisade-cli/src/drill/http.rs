//! HTTP/1.1 attacks: floods from one address and from thousands, forged
//! forwarding headers, route-limit bypass by path spelling, slowloris and
//! slow bodies. Each is made the way the daemon's own attack tests make
//! it, over raw bytes.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

use super::attack::{Attack, BoxFuture, Budget, Ctx, Layer, Outcome, budget};
use super::wire;

/// What a flood counted.
#[derive(Default)]
struct Tally {
    outcome: Outcome,
    /// Requests answered as if nothing were wrong (not 429, 403 or 503).
    admitted: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.outcome.merge(other.outcome);
        self.admitted += other.admitted;
    }
}

/// Whether a status is a control's refusal.
fn refused(status: u16) -> bool {
    matches!(status, 403 | 429 | 503)
}

/// A flood: `workers` connections at a time, each from the next of
/// `ctx.sources`, sending up to `per_conn` requests made by `request`
/// before it hangs up, until the budget's requests or seconds are spent.
async fn flood(
    ctx: &Ctx,
    workers: usize,
    per_conn: u32,
    request: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
) -> Tally {
    let start = Instant::now();
    let deadline = start + ctx.budget.seconds;
    let sent = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (ctx, sent, next, request) = (ctx.clone(), sent.clone(), next.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let budget = ctx.budget.max;
            while Instant::now() < deadline && sent.load(Ordering::Relaxed) < budget {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let from = ctx.sources[i as usize % ctx.sources.len()];
                let left = deadline.saturating_duration_since(Instant::now());
                let conn = tokio::time::timeout(left, wire::connect(from, ctx.target)).await;
                let mut conn = match conn {
                    Ok(Ok(s)) => wire::Conn::new(s),
                    Ok(Err(e)) => {
                        if wire::is_refusal(&e) {
                            t.outcome.refused_at(start.elapsed(), Layer::Accept);
                        }
                        // A refused connection still cost the daemon a
                        // handshake; do not spin on it.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    Err(_) => break,
                };
                for _ in 0..per_conn {
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    if n >= budget || Instant::now() >= deadline {
                        break;
                    }
                    t.outcome.sent += 1;
                    let left =
                        deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(500);
                    match tokio::time::timeout(left, conn.exchange(&request(n))).await {
                        Ok(Ok(r)) if refused(r.status) => t.outcome.refused_at(start.elapsed(), Layer::Http),
                        Ok(Ok(_)) => t.admitted += 1,
                        Ok(Err(e)) => {
                            if wire::is_refusal(&e) {
                                t.outcome.refused_at(start.elapsed(), Layer::Accept);
                            }
                            break;
                        }
                        Err(_) => break,
                    }
                    if conn.closed {
                        break;
                    }
                }
            }
            t
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        if let Ok(t) = task.await {
            total.merge(t);
        }
    }
    total
}

/// One address may get through at most what its limit allows over the
/// attack (with a margin for the edges of the window): more is a breach.
fn over_limit(ctx: &Ctx, what: &str, admitted: u64, limit: Option<super::attack::Limit>) -> Option<String> {
    let allowed = limit?.allowance(ctx.budget.seconds);
    let bound = allowed + allowed / 5 + 5;
    (admitted > bound).then(|| {
        format!(
            "{what}: one address got {admitted} requests through in {} s; its limit allows about {allowed}",
            ctx.budget.seconds.as_secs()
        )
    })
}

/// Many requests from one address.
pub struct Flood;

impl Attack for Flood {
    fn name(&self) -> &'static str {
        "http-flood"
    }
    fn title(&self) -> &'static str {
        "HTTP flood from one address: 32 keep-alive connections asking as fast as they are answered"
    }
    fn budget(&self, quick: bool) -> Budget {
        budget(quick, 20_000, 200_000, 15)
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let t = flood(&ctx, 32, 1000, |_| wire::get("/", "")).await;
            let mut outcome = t.outcome;
            outcome.notes.push(format!("{} requests admitted", t.admitted));
            outcome
                .breaches
                .extend(over_limit(&ctx, "flood", t.admitted, ctx.defenses.limit));
            Ok(outcome)
        })
    }
}

/// Many requests from thousands of addresses, each under every per-client
/// limit: only capacity holds this one.
pub struct ManySourceFlood;

impl Attack for ManySourceFlood {
    fn name(&self) -> &'static str {
        "http-flood-many"
    }
    fn title(&self) -> &'static str {
        "HTTP flood from 4096 addresses, each under the per-client limits, 256 connections at a time (64 under --quick)"
    }
    fn sources(&self) -> u32 {
        4096
    }
    fn budget(&self, quick: bool) -> Budget {
        budget(quick, 20_000, 200_000, 15)
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            // Nothing but capacity holds this one, and a quick drill runs on
            // whatever CI machine it gets, attacker and daemon on the same
            // cores: a quarter of the connections keeps it a test of the
            // defenses (none may refuse these clients) more than of the box.
            let workers = if ctx.quick { 64 } else { 256 };
            let t = flood(&ctx, workers, 4, |_| wire::get("/", "")).await;
            let mut outcome = t.outcome;
            outcome.notes.push(format!("{} requests admitted", t.admitted));
            Ok(outcome)
        })
    }
}

/// A flood from one address that claims, in every forwarding header, to
/// be a different client each time.
pub struct ForgedHeaders;

/// The address forged into the probe request: must never reach the upstream.
const FORGED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);

impl Attack for ForgedHeaders {
    fn name(&self) -> &'static str {
        "forged-headers"
    }
    fn title(&self) -> &'static str {
        "flood from one address with a fresh X-Forwarded-For, X-Real-IP and Forwarded on every request"
    }
    fn budget(&self, quick: bool) -> Budget {
        budget(quick, 20_000, 200_000, 15)
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let mut outcome = Outcome::default();
            // The upstream must see the real peer, not the forged one.
            let probe = forged_headers(u32::from(FORGED));
            let echoed = echo(
                &ctx,
                ctx.sources[0],
                &wire::get("/headers", &format!("{probe}Connection: close\r\n")),
            )
            .await;
            match echoed {
                Ok(text) if text.contains(&FORGED.to_string()) => outcome
                    .breaches
                    .push(format!("the upstream saw the forged client address {FORGED}")),
                Ok(_) => {}
                Err(e) => outcome.notes.push(format!("the /headers probe failed: {e}")),
            }
            let t = flood(&ctx, 32, 1000, |n| {
                let fake = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (n as u32 % (1 << 22));
                wire::get("/", &forged_headers(fake))
            })
            .await;
            outcome.merge(t.outcome);
            outcome.notes.push(format!("{} requests admitted", t.admitted));
            outcome
                .breaches
                .extend(over_limit(&ctx, "forged headers", t.admitted, ctx.defenses.limit));
            Ok(outcome)
        })
    }
}

/// Requests for the limited route's path under other spellings, each from
/// an address of its own, past the route's limit: a spelling the daemon
/// served more often than the limit allows was not counted against it.
pub struct RouteBypass;

/// The spellings of `prefix` (e.g. `/login`) that servers read as it: RFC
/// 3986 normalization (dot segments, escapes of unreserved characters),
/// merged slashes (nginx), `;parameters` (Java servers), a trailing slash,
/// a query, the absolute form, and other cases when the route is
/// case-insensitive. The first is the path itself, the control.
fn spellings(prefix: &str, case_sensitive: bool) -> Vec<String> {
    let p = prefix.trim_end_matches('/');
    let rest = p.strip_prefix('/').unwrap_or(p);
    let mut chars = rest.chars();
    let escaped = match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => format!("/%{:02x}{}", c as u32, chars.as_str()),
        _ => format!("/%2e/{rest}"),
    };
    let mut out = vec![
        p.to_owned(),
        format!("/{p}"),
        format!("/.{p}"),
        format!("/%2e{p}"),
        escaped,
        format!("{p}/"),
        format!("{p}/."),
        format!("{p};x"),
        format!("/foo/..{p}"),
        format!("/foo/%2e%2e{p}"),
        format!("{p}%2f"),
        format!("{p}?x=1"),
        format!("http://drill.test{p}"),
    ];
    if !case_sensitive {
        out.push(p.to_ascii_uppercase());
        out.push(format!("/.{};x", p.to_ascii_uppercase()));
    }
    out
}

impl Attack for RouteBypass {
    fn name(&self) -> &'static str {
        "route-bypass"
    }
    fn title(&self) -> &'static str {
        "the limited route's path spelled 15 ways (//login, /%6cogin, /login;x, /foo/../login, ...), each past the route's limit from one address"
    }
    fn sources(&self) -> u32 {
        16
    }
    fn budget(&self, quick: bool) -> Budget {
        budget(quick, 16 * 60, 16 * 200, 15)
    }
    fn skip(&self, ctx: &Ctx) -> Option<String> {
        ctx.defenses
            .route
            .is_none()
            .then(|| "no route with an enforced limit of its own and a path prefix".to_owned())
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let Some(route) = ctx.defenses.route.clone() else {
                anyhow::bail!("no limited route");
            };
            let all = spellings(&route.prefix, route.case_sensitive);
            let each = (ctx.budget.max / all.len() as u64).max(1);
            let start = Instant::now();
            let deadline = start + ctx.budget.seconds;
            let mut tasks = Vec::new();
            for (spelling, &from) in all.iter().cloned().zip(ctx.sources.iter()) {
                let target = ctx.target;
                tasks.push(tokio::spawn(async move {
                    let t = spelled(from, target, &spelling, each, start, deadline).await;
                    (spelling, t)
                }));
            }
            let allowed = route.limit.allowance(ctx.budget.seconds);
            let bound = allowed + allowed / 5 + 5;
            let mut outcome = Outcome::default();
            let mut counted = Vec::new();
            for task in tasks {
                let (spelling, t) = task.await?;
                if t.admitted > bound {
                    outcome.breaches.push(format!(
                        "{spelling}: {} of {} requests served; the {} route's limit allows about {allowed}",
                        t.admitted, t.outcome.sent, route.name
                    ));
                } else {
                    counted.push(format!("{spelling} {}", t.admitted));
                }
                outcome.merge(t.outcome);
            }
            outcome.notes.push(format!(
                "served per spelling, within the route's limit: {}",
                counted.join(", ")
            ));
            Ok(outcome)
        })
    }
}

/// Up to `n` requests for `path` from `from`, on keep-alive connections.
async fn spelled(
    from: Ipv4Addr,
    target: std::net::SocketAddr,
    path: &str,
    n: u64,
    start: Instant,
    deadline: Instant,
) -> Tally {
    let mut t = Tally::default();
    let mut conn: Option<wire::Conn> = None;
    while t.outcome.sent < n && Instant::now() < deadline {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match wire::connect(from, target).await {
                Ok(s) => wire::Conn::new(s),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        t.outcome.sent += 1;
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(500);
        match tokio::time::timeout(left, c.exchange(&wire::get(path, ""))).await {
            // 400: refused as ambiguous, never forwarded.
            Ok(Ok(r)) if refused(r.status) || r.status == 400 => {
                t.outcome.refused_at(start.elapsed(), Layer::Http);
            }
            Ok(Ok(_)) => t.admitted += 1,
            Ok(Err(_)) | Err(_) => continue,
        }
        if !c.closed {
            conn = Some(c);
        }
    }
    t
}

fn forged_headers(addr: u32) -> String {
    let a = Ipv4Addr::from(addr);
    format!("X-Forwarded-For: {a}\r\nX-Real-IP: {a}\r\nForwarded: for={a}\r\n")
}

/// One request on its own connection; the whole answer as text.
async fn echo(ctx: &Ctx, from: Ipv4Addr, request: &[u8]) -> std::io::Result<String> {
    let fut = async {
        let mut s = wire::connect(from, ctx.target).await?;
        s.write_all(request).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in 5 s",
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_a_route_start_with_the_route_and_keep_to_its_case() {
        let s = spellings("/login", false);
        assert_eq!(s[0], "/login");
        for want in [
            "//login",
            "/./login",
            "/%6cogin",
            "/login/",
            "/login;x",
            "/foo/../login",
            "/login%2f",
            "/LOGIN",
        ] {
            assert!(s.iter().any(|x| x == want), "{want} missing from {s:?}");
        }
        assert_eq!(s.len(), 15);
        let sensitive = spellings("/login/", true);
        assert!(!sensitive.iter().any(|x| x == "/LOGIN"));
        assert_eq!(sensitive[0], "/login");
    }
}
