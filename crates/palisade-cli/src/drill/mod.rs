//! `palisade drill`: real attacks on a real Palisade in network namespaces
//! the drill makes, while a legitimate population keeps using the service;
//! then a verdict per attack against thresholds the user sets.
//!
//! The run: make the namespaces ([`lab`]), start the demo upstream and
//! Palisade (this binary) in theirs ([`daemon`]), start the population
//! ([`population`]), let a baseline pass, then each attack of the catalog
//! ([`attack::catalog`]) in turn, each followed by a settling pause, all
//! measured by the monitor. Everything made is removed on the way out,
//! Ctrl-C and panics included.

use std::io::{IsTerminal as _, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use palisade_proxy::config::{Config, Overrides, QUICKSTART};
use tokio::time::Instant;

mod attack;
mod cluster;
mod daemon;
mod forged;
mod http;
mod http2;
mod lab;
mod packet;
mod population;
mod relay;
mod report;
mod slow;
mod upstream;
mod verdict;
mod wire;

use attack::{Attack, Ctx, Defenses, Limit, LimitedRoute};
use daemon::{Monitor, Sample};
use lab::Lab;
use population::{Population, Stats};
use report::{AttackReport, LegitSample, LegitSummary, Report, Resource, Thresholds};

/// The route the drill adds to the quickstart, so that the route-limit
/// bypass has a limit to try to bypass.
const DRILL_ROUTE: &str = "\n[[routes]]\nname = \"login\"\npath_prefix = \"/login\"\nrate = 5\nburst = 5\n";

/// `palisade drill` flags.
#[derive(clap::Args)]
pub struct DrillArgs {
    /// The Palisade config to attack. Its listen addresses, upstreams, TLS,
    /// state directory, feed, access log and cluster settings are replaced
    /// by the drill's own (nothing outside the namespaces is touched).
    /// Default: the quickstart, plus a `/login` route limited to 5/s.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Run only these attacks (comma-separated names; see --dry-run).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    only: Vec<String>,
    /// Leave out these attacks.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    skip: Vec<String>,
    /// Short attacks (3 s each): the whole drill within 90 s, for CI.
    #[arg(long)]
    quick: bool,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the report as a self-contained HTML page to FILE.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Print the plan (namespaces, addresses, attacks and their budgets)
    /// and exit; needs no root.
    #[arg(long)]
    dry_run: bool,
    /// Least share of legitimate requests that must succeed, during and
    /// after each attack.
    #[arg(long, default_value_t = 0.99, value_name = "SHARE")]
    min_legit_success: f64,
    /// Highest legitimate p99 latency allowed, during and after each attack.
    #[arg(long, value_name = "MS")]
    max_p99_ms: Option<f64>,
    /// How far above its baseline (a share of it) a resource may stay
    /// after an attack.
    #[arg(long, default_value_t = 0.25, value_name = "SHARE")]
    resource_slack: f64,
    /// Legitimate requests per second, all clients together.
    #[arg(long, default_value_t = 200, value_name = "RPS")]
    legit_rate: u32,
    /// Legitimate clients (addresses).
    #[arg(long, default_value_t = 50, value_name = "N")]
    legit_clients: u32,
    /// A Redis the drill may write to (never a production one): Palisade
    /// runs in cluster mode on it, and forged records are written to it.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

/// Runs the drill: whether every attack passed.
pub fn run(args: DrillArgs) -> anyhow::Result<bool> {
    let thresholds = thresholds(&args)?;
    let attacks = select(&args.only, &args.skip)?;
    let source = match &args.config {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => format!("{QUICKSTART}{DRILL_ROUTE}"),
    };
    let base = args.config.as_deref().and_then(Path::parent);
    let relay = args.redis.as_deref().map(relay::relayed).transpose()?;
    let text = rewrite(&source, base, relay.as_ref().map(|(url, _)| url.as_str()))?;
    let (text, shortened) = if args.quick {
        slow::quicken(&text, &overrides()).context("the drill cannot run this config")?
    } else {
        (text, Vec::new())
    };
    let config = Config::parse(&text, "drill config", &overrides())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("the drill cannot run this config")?;
    let defenses = Arc::new(defenses(&config));
    let names = Lab::names()?;
    if args.dry_run {
        print_plan(&args, &names, &attacks, &defenses, &shortened);
        return Ok(true);
    }
    if !lab::is_root() {
        bail!(
            "palisade drill needs root: it makes network namespaces and veth pairs and runs \
             floods inside them (run it with sudo; --dry-run shows the plan without root)"
        );
    }
    lab::catch_signals();
    lab::sweep_stale();
    let dir = TempDir::new()?;
    let config_path = dir.0.join("palisade.toml");
    std::fs::write(&config_path, &text).context("writing the drill's config")?;
    let lab = Lab::create(names)?;
    if let Some((_, target)) = relay {
        relay::remember_host()?;
        relay::start(&lab.server, target)?;
    }
    let _upstream = daemon::start_upstream(&lab, &dir.0)?;
    interrupted()?;
    let palisade = daemon::start_palisade(&lab, &config_path, &dir.0)?;
    interrupted()?;
    // From here on this thread, and every thread it starts (the runtime's),
    // opens its sockets in the client namespace.
    Lab::enter(&lab.client)?;
    // Attackers in life run on machines of their own; here they share the
    // CPU with Palisade, and a closed-loop flood would take as much of it as
    // the kernel gives. At a lower priority (lab::ATTACKER_NICE) they still
    // send as fast as they are answered, but cannot starve the daemon of
    // the CPU they do not have in life (what they did send is in the
    // report, per CPU-second).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| lab::set_nice(lab::ATTACKER_NICE))
        .build()
        .context("starting the async runtime")?;
    // The legitimate population gets threads of its own: on the attackers'
    // runtime, its requests would queue behind hundreds of attack tasks and
    // the drill would measure its own scheduler, not Palisade. Its own
    // threads get their share of the CPU from the kernel, as real clients
    // on other machines would not even compete for it.
    let legit_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("drill-legit")
        .on_thread_start(|| lab::set_nice(lab::MEASURED_NICE))
        .enable_all()
        .build()
        .context("starting the legitimate population's runtime")?;
    let legit: Arc<[Ipv4Addr]> = (1..=args.legit_clients).map(lab::bindable).collect();
    let monitor = Monitor::start(
        &lab.server,
        palisade.pid(),
        config.admin.metrics_path.clone(),
        legit.clone(),
        Instant::now(),
    );
    let run = Run {
        legit_runtime: legit_runtime.handle().clone(),
        legit,
        admin: daemon::Admin::new(&lab.server, &config.admin.metrics_path),
        upstream_pool: (config.upstream.pool_max_idle * config.upstream_urls().count()) as u64,
        quick: args.quick,
        thresholds,
        defenses,
        redis: args.redis.clone(),
        legit_rate: args.legit_rate,
        legit_clients: args.legit_clients,
        upstream_ns: lab.upstream.clone(),
        config: args
            .config
            .as_ref()
            .map_or_else(|| "quickstart".to_owned(), |p| p.display().to_string()),
    };
    let report = runtime.block_on(run.drill(&attacks, &monitor))?;
    drop(monitor);
    if let Some(path) = &args.json {
        report
            .write_json(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        report
            .write_html(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    interrupted()?;
    Ok(report.pass)
}

/// Fails once a signal asked the drill to stop.
fn interrupted() -> anyhow::Result<()> {
    if lab::stopped() {
        bail!("interrupted; everything the drill made is removed");
    }
    Ok(())
}

fn thresholds(args: &DrillArgs) -> anyhow::Result<Thresholds> {
    if !(0.0..=1.0).contains(&args.min_legit_success) {
        bail!("--min-legit-success: a share between 0 and 1, e.g. 0.99");
    }
    if args.resource_slack < 0.0 || !args.resource_slack.is_finite() {
        bail!("--resource-slack: a share of at least 0, e.g. 0.25");
    }
    if args.legit_rate == 0 || args.legit_clients == 0 {
        bail!("--legit-rate and --legit-clients: at least 1");
    }
    Ok(Thresholds {
        min_legit_success: args.min_legit_success,
        max_p99_ms: args.max_p99_ms,
        resource_slack: args.resource_slack,
    })
}

/// The catalog, narrowed by `--only` and `--skip`; an unknown name is an
/// error that lists the known ones.
fn select(only: &[String], skip: &[String]) -> anyhow::Result<Vec<Box<dyn Attack>>> {
    let all = attack::catalog();
    let known: Vec<&str> = all.iter().map(|a| a.name()).collect();
    for name in only.iter().chain(skip) {
        if !known.contains(&name.as_str()) {
            bail!("no attack named {name:?}; the catalog: {}", known.join(", "));
        }
    }
    Ok(all
        .into_iter()
        .filter(|a| only.is_empty() || only.iter().any(|n| n == a.name()))
        .filter(|a| !skip.iter().any(|n| n == a.name()))
        .collect())
}

/// What `palisade run` is told on its command line, so that the config
/// is checked as it will run.
fn overrides() -> Overrides {
    Overrides {
        listen: Some(daemon::proxy_addr()),
        admin: Some(daemon::admin_addr()),
        upstreams: vec![format!("http://{}", daemon::upstream_addr())],
        ..Overrides::default()
    }
}

/// The user's config with everything that reaches outside the drill's
/// namespaces, or would make its clients speak something else than
/// cleartext HTTP, turned off: learned state, the feed, the access log
/// file, TLS, PROXY protocol, the maintenance page, the metrics listener,
/// the cluster (unless `--redis` names one for the drill). Relative paths
/// that stay are made absolute, as the file moves.
fn rewrite(source: &str, base: Option<&Path>, redis: Option<&str>) -> anyhow::Result<String> {
    let mut doc: toml::Table = source.parse().context("the config is not valid TOML")?;
    let store_path = doc
        .get("store")
        .and_then(|s| s.get("path"))
        .and_then(|p| p.as_str())
        .map(str::to_owned);
    let mut set = |table: &str, key: &str, value: toml::Value| {
        let entry = doc
            .entry(table)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(t) = entry.as_table_mut() {
            t.insert(key.to_owned(), value);
        }
    };
    let empty = || toml::Value::String(String::new());
    set("state", "data_dir", empty());
    set("store", "feed", empty());
    set("access_log", "enabled", toml::Value::Boolean(false));
    set("tls", "cert", empty());
    set("tls", "key", empty());
    set("server", "proxy_protocol", toml::Value::Boolean(false));
    set("server", "maintenance_page", empty());
    set("admin", "metrics_listen", empty());
    for key in ["tls_ca", "tls_client_cert", "tls_client_key", "tls_server_name"] {
        set("upstream", key, empty());
    }
    match redis {
        Some(url) => {
            set("cluster", "redis", toml::Value::String(url.to_owned()));
            let prefix = format!("palisade-drill-{}", lab::random_hex(4)?);
            set("cluster", "key_prefix", toml::Value::String(prefix));
            set("cluster", "key", toml::Value::String(lab::random_hex(32)?));
        }
        None => set("cluster", "redis", empty()),
    }
    if let (Some(base), Some(path)) = (base, store_path)
        && !path.is_empty()
        && Path::new(&path).is_relative()
    {
        let abs = base.join(&path).to_string_lossy().into_owned();
        set("store", "path", toml::Value::String(abs));
    }
    toml::to_string(&doc).context("writing the drill's config")
}

/// What attacks need to know of the config.
fn defenses(config: &Config) -> Defenses {
    use palisade_core::Mode;
    macro_rules! limit {
        ($p:expr) => {{
            let p = $p;
            (p.mode == Mode::Enforce).then(|| Limit {
                per_second: f64::from(p.quota.rate.get()) / p.quota.per.secs() as f64,
                burst: p.quota.burst.get(),
            })
        }};
    }
    let route = config.shield.routes.iter().find_map(|r| {
        let prefix = r.matcher.path_prefix.clone()?;
        if !r.matcher.methods.is_empty() || r.matcher.host.is_some() {
            return None;
        }
        Some(LimitedRoute {
            name: r.name.clone(),
            prefix,
            limit: limit!(r.limit.as_ref()?)?,
            case_sensitive: r.matcher.case_sensitive,
        })
    });
    Defenses {
        limit: config.shield.limit.as_ref().and_then(|p| limit!(p)),
        route,
        header_read_timeout: config.server.header_read_timeout,
        body_rate_grace: config.server.body_rate_grace,
        body_min_rate: config.server.body_min_rate,
        write_timeout: config.server.write_timeout,
        max_conns_per_ip: config.connections.max_per_ip,
        cluster_prefix: config.cluster.as_ref().map(|c| c.key_prefix.clone()),
    }
}

fn print_plan(
    args: &DrillArgs,
    names: &[String; 3],
    attacks: &[Box<dyn Attack>],
    d: &Defenses,
    shortened: &[&str],
) {
    let config = args.config.as_ref().map_or_else(
        || "the quickstart plus a /login route at 5/s".to_owned(),
        |p| p.display().to_string(),
    );
    println!(
        "palisade drill plan ({})",
        if args.quick { "quick" } else { "full" }
    );
    println!("  namespaces   {}", names.join(", "));
    println!(
        "  palisade     {} (config: {config}), admin {} inside the server namespace",
        daemon::proxy_addr(),
        daemon::admin_addr()
    );
    println!("  upstream     demo upstream on {}", daemon::upstream_addr());
    println!(
        "  legitimate   {} requests/s from {} addresses ({} ...)",
        args.legit_rate,
        args.legit_clients,
        lab::bindable(1)
    );
    match &d.route {
        Some(r) => println!(
            "  route        {} ({}, {}/s)",
            r.name, r.prefix, r.limit.per_second
        ),
        None => println!("  route        none with a limit of its own: route-bypass is skipped"),
    }
    if !shortened.is_empty() {
        println!(
            "  deadlines    --quick sets server.{} to {} (left at their defaults), so slow clients are cut within seconds",
            shortened.join(", server."),
            slow::QUICK_DEADLINE
        );
    }
    println!("  attacks");
    for a in attacks {
        let b = a.budget(args.quick);
        println!(
            "    {:<20} {:>3} s, at most {:>7}  {}",
            a.name(),
            b.seconds.as_secs(),
            b.max,
            a.title()
        );
    }
    println!(
        "  verdicts     legitimate success >= {} during and after; fds and RSS back within {} % (+{} fds, +{} MiB)",
        args.min_legit_success,
        args.resource_slack * 100.0,
        verdict::FD_FLOOR,
        verdict::RSS_FLOOR_KIB >> 10
    );
}

/// A directory for the drill's config and logs, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "palisade-drill-{}-{}",
            std::process::id(),
            lab::random_hex(4)?
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One drill's settings.
struct Run {
    /// Where the legitimate population runs.
    legit_runtime: tokio::runtime::Handle,
    /// Its addresses.
    legit: Arc<[Ipv4Addr]>,
    admin: daemon::Admin,
    /// Most idle connections the upstream pools keep, all together.
    upstream_pool: u64,
    quick: bool,
    thresholds: Thresholds,
    defenses: Arc<Defenses>,
    redis: Option<String>,
    legit_rate: u32,
    legit_clients: u32,
    upstream_ns: String,
    config: String,
}

/// When an attack ran, for judging it once every answer is in.
struct Window {
    start: Duration,
    end: Duration,
    settled: Duration,
}

/// The first address attacks take theirs from (legitimate clients have
/// the ones below).
const ATTACK_SOURCES: u32 = 1024;

impl Run {
    /// Quiet time before the first attack, and after each.
    fn settle(&self) -> Duration {
        if self.quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(5)
        }
    }

    async fn drill(&self, attacks: &[Box<dyn Attack>], monitor: &Monitor) -> anyhow::Result<Report> {
        let started_unix_ms = palisade_core::unix_now_ms();
        let t0 = Instant::now();
        let legit = self.legit.clone();
        let population = Population::start(
            &self.legit_runtime,
            daemon::proxy_addr(),
            legit.to_vec(),
            self.legit_rate,
            t0,
        );
        let out = Progress::new();
        out.line(&format!(
            "palisade drill: {} attacks, {} legitimate requests/s from {} addresses",
            attacks.len(),
            self.legit_rate,
            self.legit_clients
        ));
        pause(self.settle()).await;
        let mut next_source = ATTACK_SOURCES;
        let mut ran = Vec::new();
        for a in attacks {
            if lab::stopped() {
                break;
            }
            let sources: Arc<[Ipv4Addr]> = (next_source..next_source + a.sources())
                .map(lab::bindable)
                .collect();
            next_source += a.sources();
            let ctx = Ctx {
                target: daemon::proxy_addr(),
                upstream: daemon::upstream_addr(),
                upstream_ns: self.upstream_ns.clone(),
                sources,
                spoof: (Ipv4Addr::new(198, 19, 0, 0), 16),
                budget: a.budget(self.quick),
                quick: self.quick,
                defenses: self.defenses.clone(),
                redis: self.redis.clone(),
                legit: legit.clone(),
                admin: self.admin.clone(),
            };
            let start = t0.elapsed();
            if let Some(why) = a.skip(&ctx) {
                out.line(&format!("{:<20} skipped: {why}", a.name()));
                ran.push((
                    a,
                    Window {
                        start,
                        end: start,
                        settled: start,
                    },
                    Err(why),
                ));
                continue;
            }
            let outcome = self.one(a.as_ref(), ctx, &out).await;
            let end = t0.elapsed();
            pause(self.settle()).await;
            let waited = self.recover(monitor, start).await;
            let settled = t0.elapsed();
            let mut outcome = outcome.unwrap_or_else(|e| attack::Outcome {
                breaches: vec![format!("the attack itself failed: {e:#}")],
                ..attack::Outcome::default()
            });
            if let Some(waited) = waited.filter(|w| *w >= daemon::EVERY) {
                outcome.notes.push(format!(
                    "descriptors and memory took {} ms past the {} s settling pause to come back",
                    waited.as_millis(),
                    self.settle().as_secs()
                ));
            }
            out.line(&format!("{:<20} done: {} sent", a.name(), outcome.sent));
            ran.push((a, Window { start, end, settled }, Ok(outcome)));
        }
        let until = t0.elapsed();
        let records = population.stop().await;
        let stats = |from, to| Stats::of(records.iter().filter(|r| r.at >= from && r.at < to));
        let mut reports = Vec::new();
        for (a, w, outcome) in ran {
            let r = match outcome {
                Err(why) => skipped(a.as_ref(), &w, why),
                Ok(outcome) => {
                    let after_to = w.settled.saturating_sub(population::TIMEOUT).max(w.end);
                    let notes = outcome.notes.clone();
                    let r = self.judge(
                        a.as_ref(),
                        &w,
                        outcome,
                        stats(w.start, w.end),
                        stats(w.end, after_to),
                        monitor,
                    );
                    out.verdict(&r, &notes);
                    r
                }
            };
            reports.push(r);
        }
        let legit = population::buckets(&records, Duration::from_millis(report::BUCKET_MS), until)
            .into_iter()
            .map(|(t, s)| LegitSample {
                t_ms: ms(t),
                sent: s.sent,
                ok: s.ok,
                p99_us: u64::try_from(s.p99.as_micros()).unwrap_or(u64::MAX),
            })
            .collect();
        let pass = reports.iter().all(|r| r.verdict.pass);
        out.line(&held_line(&reports));
        Ok(Report {
            version: 1,
            started_unix_ms,
            config: self.config.clone(),
            quick: self.quick,
            thresholds: self.thresholds.clone(),
            legit,
            attacks: reports,
            pass,
        })
    }

    /// Waits, up to three [`Self::settle`]s more, until the daemon's descriptors
    /// and memory are back within the verdict's bounds of what they were
    /// when the attack started at `start`: some come back only with a
    /// deadline (a connection the daemon closed keeps its descriptor until
    /// the peer answers or the write deadline passes), and the next attack
    /// must not be charged with them. What is still out when the wait ends
    /// fails the verdict. How long it waited, if it could tell.
    async fn recover(&self, monitor: &Monitor, start: Duration) -> Option<Duration> {
        let before = monitor.before(start)?;
        let began = Instant::now();
        let until = began + self.settle() * 3;
        while Instant::now() < until && !lab::stopped() {
            let latest = monitor.latest();
            if latest.is_some_and(|s| {
                verdict::recovered(
                    &self.thresholds,
                    self.upstream_pool,
                    [before.fds, before.rss_kib],
                    [s.fds, s.upstream_fds, s.rss_kib],
                )
            }) {
                return Some(began.elapsed());
            }
            pause(daemon::EVERY).await;
        }
        Some(began.elapsed())
    }

    /// Runs one attack, cut off a little after its seconds, with a
    /// progress line; a signal ends it early.
    async fn one(&self, a: &dyn Attack, ctx: Ctx, out: &Progress) -> anyhow::Result<attack::Outcome> {
        let secs = ctx.budget.seconds;
        let started = Instant::now();
        let run = tokio::time::timeout(secs + Duration::from_secs(3), a.run(ctx));
        tokio::pin!(run);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                r = &mut run => {
                    return r.unwrap_or_else(|_| bail!("it did not stop within 3 s of its budget"));
                }
                _ = tick.tick() => {
                    if lab::stopped() {
                        bail!("interrupted");
                    }
                    out.progress(a.name(), started.elapsed(), secs);
                }
            }
        }
    }

    fn judge(
        &self,
        a: &dyn Attack,
        w: &Window,
        outcome: attack::Outcome,
        during: Stats,
        after: Stats,
        monitor: &Monitor,
    ) -> AttackReport {
        let before = monitor
            .before(w.start)
            .or_else(|| monitor.window(w.start, w.end).first().copied());
        let span = monitor.window(w.start, w.settled);
        let during_samples: Vec<Sample> = span
            .iter()
            .filter(|s| s.at < w.end + daemon::EVERY)
            .copied()
            .collect();
        let last = span.last().copied().or(before);
        let zero = Sample {
            at: w.start,
            counters: daemon::Counters::default(),
            cpu_s: 0.0,
            fds: 0,
            upstream_fds: 0,
            rss_kib: 0,
        };
        let before = before.unwrap_or(zero);
        let settled = last.unwrap_or(zero);
        let since = |at: Duration| ms(at.saturating_sub(w.start));
        let detected = span
            .iter()
            .find(|s| s.counters.noticed_since(&before.counters))
            .map(|s| since(s.at));
        // A hundredth of what the attack sent, for a layer to have acted.
        let stray = outcome.sent as f64 / 100.0;
        let mitigated_metrics = span
            .iter()
            .find(|s| s.counters.layer_since(&before.counters, stray).is_some())
            .map(|s| since(s.at));
        let seen = outcome.refused.map(|(at, _)| ms(at));
        let mitigated = [mitigated_metrics, seen].into_iter().flatten().min();
        let layer = settled
            .counters
            .layer_since(&before.counters, stray)
            .or(outcome.refused.map(|(_, l)| l));
        let detected = [detected, mitigated].into_iter().flatten().min();
        let peak = |f: fn(&Sample) -> u64| during_samples.iter().map(f).max().unwrap_or(0);
        let fds = Resource {
            before: before.fds,
            during: peak(|s| s.fds).max(before.fds),
            after: settled.fds,
        };
        let upstream_conns = Resource {
            before: before.upstream_fds,
            during: peak(|s| s.upstream_fds).max(before.upstream_fds),
            after: settled.upstream_fds,
        };
        let rss_kib = Resource {
            before: before.rss_kib,
            during: peak(|s| s.rss_kib).max(before.rss_kib),
            after: settled.rss_kib,
        };
        let cpu_end = during_samples.last().map_or(before.cpu_s, |s| s.cpu_s);
        let breaches = outcome.breaches;
        let measured = verdict::Measured {
            during,
            after,
            fds,
            upstream_conns,
            upstream_pool: self.upstream_pool,
            rss_kib,
            breaches,
        };
        AttackReport {
            name: a.name().to_owned(),
            title: a.title().to_owned(),
            start_ms: ms(w.start),
            end_ms: ms(w.end),
            skipped: None,
            detected_ms: detected,
            mitigated_ms: mitigated,
            layer,
            attack_sent: outcome.sent,
            palisade_cpu_s: (cpu_end - before.cpu_s).max(0.0),
            legit_during: summary(&during),
            legit_after: summary(&after),
            fds,
            upstream_conns,
            rss_kib,
            verdict: verdict::judge(&self.thresholds, &measured),
        }
    }
}

fn skipped(a: &dyn Attack, w: &Window, why: String) -> AttackReport {
    let none = LegitSummary {
        success: 0.0,
        p99_ms: 0.0,
    };
    let zero = Resource {
        before: 0,
        during: 0,
        after: 0,
    };
    AttackReport {
        name: a.name().to_owned(),
        title: a.title().to_owned(),
        start_ms: ms(w.start),
        end_ms: ms(w.start),
        skipped: Some(why),
        detected_ms: None,
        mitigated_ms: None,
        layer: None,
        attack_sent: 0,
        palisade_cpu_s: 0.0,
        legit_during: none,
        legit_after: none,
        fds: zero,
        upstream_conns: zero,
        rss_kib: zero,
        verdict: report::Verdict {
            pass: true,
            reasons: Vec::new(),
        },
    }
}

/// The run's last line: a skipped attack is neither held nor failed.
fn held_line(reports: &[AttackReport]) -> String {
    let ran: Vec<_> = reports.iter().filter(|r| r.skipped.is_none()).collect();
    let held = ran.iter().filter(|r| r.verdict.pass).count();
    let skipped = reports.len() - ran.len();
    let mut line = format!("palisade drill: {held} of {} attacks held", ran.len());
    if skipped > 0 {
        line.push_str(&format!(", {skipped} skipped"));
    }
    line
}

fn layer_name(l: report::Layer) -> &'static str {
    match l {
        report::Layer::Xdp => "xdp",
        report::Layer::Nftables => "nftables",
        report::Layer::Accept => "accept",
        report::Layer::Http => "http",
    }
}

fn summary(s: &Stats) -> LegitSummary {
    LegitSummary {
        success: s.success(),
        p99_ms: s.p99.as_secs_f64() * 1e3,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Sleeps `d`, or less when a signal asks the drill to stop.
async fn pause(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !lab::stopped() {
        tokio::time::sleep(Duration::from_millis(50).min(end - Instant::now())).await;
    }
}

/// The terminal view: one line per attack, redrawn in place on a terminal,
/// plain lines otherwise.
struct Progress {
    tty: bool,
}

impl Progress {
    fn new() -> Self {
        Self {
            tty: std::io::stdout().is_terminal(),
        }
    }

    fn line(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = if self.tty {
            writeln!(out, "\r\x1b[2K{text}")
        } else {
            writeln!(out, "{text}")
        };
        let _ = out.flush();
    }

    fn progress(&self, name: &str, elapsed: Duration, of: Duration) {
        if !self.tty {
            return;
        }
        let width = 20usize;
        let done =
            ((elapsed.as_secs_f64() / of.as_secs_f64().max(0.001)) * width as f64).min(width as f64) as usize;
        let mut out = std::io::stdout().lock();
        let _ = write!(
            out,
            "\r\x1b[2K{name:<20} [{}{}] {:.1}/{:.0} s",
            "#".repeat(done),
            " ".repeat(width - done),
            elapsed.as_secs_f64(),
            of.as_secs_f64()
        );
        let _ = out.flush();
    }

    fn verdict(&self, r: &AttackReport, notes: &[String]) {
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
        self.line(&format!(
            "{:<20} {}  detected {}, mitigated {} ({}), legit {:.1} % / {:.1} % after, sent {}, {:.0}/cpu-s",
            r.name,
            if r.verdict.pass { "PASS" } else { "FAIL" },
            opt(r.detected_ms),
            opt(r.mitigated_ms),
            r.layer.map_or("-", layer_name),
            r.legit_during.success * 100.0,
            r.legit_after.success * 100.0,
            r.attack_sent,
            r.attack_sent as f64 / r.palisade_cpu_s.max(0.001)
        ));
        for reason in &r.verdict.reasons {
            self.line(&format!("{:<20}   {reason}", ""));
        }
        for note in notes {
            self.line(&format!("{:<20}   ({note})", ""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_attack_is_neither_held_nor_failed() {
        let w = Window {
            start: Duration::ZERO,
            end: Duration::ZERO,
            settled: Duration::ZERO,
        };
        let skip = skipped(&cluster::ForgedRedis, &w, "needs --redis".into());
        let mut held = skipped(&http::Flood, &w, String::new());
        held.skipped = None;
        held.verdict.pass = true;
        let mut failed = held.clone();
        failed.verdict.pass = false;
        assert_eq!(
            held_line(&[held.clone(), skip.clone()]),
            "palisade drill: 1 of 1 attacks held, 1 skipped"
        );
        assert_eq!(held_line(&[held, failed]), "palisade drill: 1 of 2 attacks held");
    }

    #[test]
    fn the_rewritten_config_reaches_nothing_outside_the_drill() {
        let user = "[server]\nlisten = \"0.0.0.0:443\"\nupstreams = [\"http://10.0.0.5:80\"]\n\
                    [state]\ndata_dir = \"/var/lib/palisade\"\n[store]\npath = \"rep.bin\"\nfeed = \"https://feed\"\n\
                    [access_log]\nenabled = true\npath = \"/var/log/p.log\"\n\
                    [cluster]\nredis = \"redis://prod:6379\"\n";
        let text = rewrite(user, Some(Path::new("/etc/palisade")), None).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["state"]["data_dir"].as_str(), Some(""));
        assert_eq!(doc["store"]["feed"].as_str(), Some(""));
        assert_eq!(doc["store"]["path"].as_str(), Some("/etc/palisade/rep.bin"));
        assert_eq!(doc["access_log"]["enabled"].as_bool(), Some(false));
        assert_eq!(doc["cluster"]["redis"].as_str(), Some(""));
        // What the user set otherwise stays.
        assert_eq!(doc["server"]["listen"].as_str(), Some("0.0.0.0:443"));
    }

    #[test]
    fn the_quickstart_drill_config_loads_with_its_route() {
        let text = rewrite(&format!("{QUICKSTART}{DRILL_ROUTE}"), None, None).unwrap();
        let config = Config::parse(&text, "drill", &overrides()).unwrap();
        let d = defenses(&config);
        let route = d.route.unwrap();
        assert_eq!((route.prefix.as_str(), route.limit.burst), ("/login", 5));
        assert_eq!(d.limit.unwrap().per_second, 100.0);
        assert_eq!(config.server.listen, daemon::proxy_addr());
    }

    #[test]
    fn unknown_attack_names_are_refused_with_the_catalog() {
        let e = select(&["nope".into()], &[]).err().unwrap().to_string();
        assert!(e.contains("http-flood"), "{e}");
        let only = select(&["http-flood".into()], &[]).unwrap();
        assert_eq!(only.len(), 1);
        let rest = select(&[], &["http-flood".into()]).unwrap();
        assert!(rest.iter().all(|a| a.name() != "http-flood"));
    }
}
