//! `palisade`: parse flags, load config, run, exit code.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use palisade_proxy::config::{Config, Overrides, QUICKSTART, Secret};
use palisade_proxy::proxy::ConfigSource;

mod bans;
mod drill;
mod health;
mod notify;
mod store;

/// Exit code for a config that does not load (sysexits' `EX_CONFIG`):
/// service managers stop restarting on it (`RestartPreventExitStatus=78`).
const EXIT_CONFIG: u8 = 78;

/// A config that does not load (the file, a flag or the environment): the
/// daemon exits with [`EXIT_CONFIG`].
#[derive(Debug)]
struct BadConfig(String);

impl std::fmt::Display for BadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BadConfig {}

/// Anti-DDoS reverse proxy: per-client rate limits, IP reputation,
/// slow-client defense, Prometheus metrics.
#[derive(Parser)]
#[command(name = "palisade", version)]
struct Cli {
    /// Log level on stderr: error, warn, info, debug, trace or off, or
    /// directives in RUST_LOG syntax (`palisade_proxy=debug,hyper=warn`).
    /// Wins over RUST_LOG; without either, info.
    #[arg(long, global = true, env = "PALISADE_LOG_LEVEL", value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log format on stderr: `text` or `json` (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "PALISADE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy. Without --config: the built-in quickstart (proxy on
    /// 127.0.0.1:8080, demo upstream on 127.0.0.1:8081, admin on 127.0.0.1:9090).
    ///
    /// SIGTERM or SIGINT: /readyz answers 503, requests are still served for
    /// server.drain_delay (a second signal ends it), then in-flight requests
    /// finish within server.shutdown_grace and the exit code is 0. SIGHUP
    /// reloads the config file; SIGUSR1 reopens the access log file.
    Run(RunArgs),
    /// Run only the demo upstream (`/`, `/status/{code}`, `/delay/{ms}`, `/bytes/{n}`).
    DemoUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Config file helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Same as `config check`.
    #[command(hide = true)]
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Ask a running daemon whether it is ready (`/readyz`): exit 0 when
    /// it answers 200, 1 otherwise. For container health checks and probes.
    Health(health::HealthArgs),
    /// Kernel bans of a running daemon (admin API): list, add, del.
    Bans(bans::BansArgs),
    /// Print a shell completion script, e.g.
    /// `palisade completions bash > /etc/bash_completion.d/palisade`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `palisade man | man -l -`.
    Man {
        /// Write palisade.1 and a page per subcommand (palisade-run.1, ...)
        /// into this directory instead, e.g. /usr/local/share/man/man1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Attack a Palisade of its own with real attacks, in network
    /// namespaces it makes, while legitimate clients keep using it; report
    /// what each defense did and a verdict per attack. Needs root; exit 1
    /// when an attack's verdict fails. `--dry-run` prints the plan.
    Drill(Box<drill::DrillArgs>),
    /// Reputation store snapshots and feeds: build, lookup, apply-delta, info,
    /// keygen, sign, verify.
    Store {
        #[command(subcommand)]
        command: store::StoreCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the quickstart config: every key, its default and meaning.
    Default,
    /// Validate a config file: exit 0, or print FILE:LINE:COL: key: problem
    /// and exit 78.
    Check {
        /// The file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Proxy listen address (wins over the file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listen address (wins over the file).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Upstream URL; repeat for several (replaces the file's list).
    #[arg(long = "upstream", value_name = "URL")]
    upstreams: Vec<String>,
    /// Per-client requests per second (moves burst, window and flood
    /// threshold defaults with it).
    #[arg(long, value_name = "RPS")]
    rate_limit: Option<NonZeroU32>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Cluster mode: share limits and reputation through this Redis
    /// (redis:// or rediss://; wins over the file's cluster.redis). A
    /// password in it is readable by every local user in the process's
    /// command line: give it in PALISADE_REDIS_URL instead.
    #[arg(long, value_name = "URL", env = "PALISADE_REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
}

/// `0.1.0 (XDP: compiled in)`: whether the kernel defense can drop floods
/// in the driver is fixed at build time, so `--version` says it.
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let xdp = if palisade_proxy::xdp_built() {
            "XDP: compiled in"
        } else {
            "XDP: not compiled in, clang and libbpf-dev were missing at build time"
        };
        format!("{} ({xdp})", env!("CARGO_PKG_VERSION"))
    })
}

/// The command line as clap sees it (also for completions and the man page).
fn command() -> clap::Command {
    use clap::CommandFactory as _;
    Cli::command().version(version())
}

/// Levels accepted alone; anything else must be a directive.
const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// The log filter: `--log-level` (or `PALISADE_LOG_LEVEL`), else RUST_LOG,
/// else info. A bare word that is not a level is refused: the filter would
/// take it for a target name and log nothing else.
fn log_filter(level: Option<&str>, source: &str) -> Result<tracing_subscriber::EnvFilter, BadConfig> {
    use tracing_subscriber::EnvFilter;
    let Some(level) = level.map(str::trim) else {
        return Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    };
    let hint =
        "levels: error, warn, info, debug, trace, off; or directives such as palisade_proxy=debug,hyper=warn";
    if !level.contains(['=', ',', '[']) && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
        return Err(BadConfig(format!("{source} {level:?}: not a log level ({hint})")));
    }
    EnvFilter::try_new(level).map_err(|e| BadConfig(format!("{source} {level:?}: {e} ({hint})")))
}

fn main() -> ExitCode {
    use clap::FromArgMatches as _;
    let matches = command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let source = match matches.value_source("log_level") {
        Some(clap::parser::ValueSource::EnvVariable) => "PALISADE_LOG_LEVEL",
        _ => "--log-level",
    };
    // Checked whatever the command, so a typo never waits for the next restart.
    let filter = match log_filter(cli.log_level.as_deref(), source) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("palisade: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        // Built in memory, then written: clap_complete panics on a write error
        // (`palisade completions bash | head`).
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command(), "palisade", &mut script);
            print_bytes(&script)
        }
        Command::Man { dir: Some(dir) } => std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(command(), &dir))
            .with_context(|| format!("writing man pages to {}", dir.display())),
        Command::Man { dir: None } => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command())
                .render(&mut page)
                .context("rendering the man page")
                .and_then(|()| print_bytes(&page))
        }
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{QUICKSTART}");
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        }
        | Command::CheckConfig { file } => match Config::load(&file, &Overrides::default().with_env()) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        Command::Health(args) => return health::run(&args),
        Command::Bans(args) => bans::run(args),
        Command::Store { command } => match store::run(command) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Drill(args) => match drill::run(*args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::DemoUpstream { listen } => {
            runtime(cli.log_format, filter).and_then(|rt| rt.block_on(demo(listen)))
        }
        Command::Run(args) => runtime(cli.log_format, filter).and_then(|rt| rt.block_on(run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<BadConfig>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("palisade: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

fn runtime(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
) -> anyhow::Result<tokio::runtime::Runtime> {
    use std::io::IsTerminal as _;
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn demo(listen: SocketAddr) -> anyhow::Result<()> {
    let Signals { mut terminate, .. } = Signals::install();
    let (addr, serve) = palisade_proxy::demo::bind(listen).await?;
    tracing::info!("demo upstream on http://{addr}");
    tokio::select! {
        _ = serve => {}
        () = terminate.recv() => {}
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Before any listener binds: a service manager may send SIGHUP or SIGTERM
    // the moment the port accepts, and the default action would kill us.
    let signals = Signals::install();
    let overrides = Overrides {
        listen: args.listen,
        admin: args.admin,
        upstreams: args.upstreams,
        rate_limit: args.rate_limit,
        // Relative to where the command runs, whatever reloads do later.
        tls_cert: args.tls_cert.map(std::path::absolute).transpose()?,
        tls_key: args.tls_key.map(std::path::absolute).transpose()?,
        redis: args.redis,
        cluster_key: None,
    }
    .with_env();
    let quickstart = args.config.is_none();
    let mut config = match &args.config {
        Some(path) => Config::load(path, &overrides).map_err(|e| BadConfig(e.to_string()))?,
        None => Config::quickstart(&overrides).map_err(|e| BadConfig(e.to_string()))?,
    };
    let env_token = std::env::var("PALISADE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if let Some(path) = &args.config {
        warn_if_others_read_secrets(path, &config, &overrides, env_token.is_some());
    }
    if let Some(token) = &env_token {
        palisade_proxy::config::check_token(token)
            .map_err(|m| BadConfig(format!("PALISADE_ADMIN_TOKEN: {m}")))?;
        config.admin.token = Some(Secret::new(token.clone()));
    }
    let mut made_up_token = false;
    if quickstart && config.admin.token.is_none() {
        config.admin.token = Some(Secret::new(random_token()?));
        made_up_token = true;
    }
    // The demo upstream runs only in the quickstart, where it is the upstream.
    let demo = if quickstart && overrides.upstreams.is_empty() {
        let target = config
            .upstream_urls()
            .next()
            .and_then(|u| u.authority())
            .and_then(|a| {
                format!("{}:{}", a.host(), a.port_u16().unwrap_or(80))
                    .parse()
                    .ok()
            })
            .context("quickstart upstream is not an address")?;
        let (addr, serve) = palisade_proxy::demo::bind(target).await?;
        Some((addr, tokio::spawn(serve)))
    } else {
        None
    };
    let upstreams: Vec<String> = config.upstream_urls().map(|u| u.to_string()).collect();
    let token = config.admin.token.clone();
    let metrics_path = config.admin.metrics_path.clone();
    let tls = config.tls.is_some();
    let source = args.config.map(|path| ConfigSource {
        path,
        overrides: overrides.clone(),
        token: env_token.map(Secret::new),
    });
    let reloadable = source.is_some();
    let running = palisade_proxy::start_reloadable(config, source).await?;
    let Signals {
        hangup,
        user1,
        mut terminate,
    } = signals;
    on_sighup(hangup, running.app.clone(), reloadable);
    on_sigusr1(user1, running.app.clone());
    let proxy = running.proxy_addr;
    let admin = running.admin_addr;
    match running.metrics_addr {
        Some(metrics) => tracing::info!(%proxy, %admin, %metrics, upstreams = ?upstreams, "palisade running"),
        None => tracing::info!(%proxy, %admin, upstreams = ?upstreams, "palisade running"),
    }
    notify::ready();
    if quickstart {
        println!("Palisade quickstart (built-in config: `palisade config default` prints it)");
        let scheme = if tls { "https" } else { "http" };
        println!("  proxy        {scheme}://{proxy}  ->  {}", upstreams.join(", "));
        if let Some((addr, _)) = &demo {
            println!("  demo         http://{addr}  (/, /status/{{code}}, /delay/{{ms}}, /bytes/{{n}})");
        }
        println!("  metrics      curl -s http://{admin}{metrics_path}");
        println!("  reputation   curl http://{admin}/api/v1/reputation/127.0.0.1");
        match running.app.syn() {
            Some(d) => println!(
                "  SYN defense  curl http://{admin}/syn-stats  (capture {}, bans: {})",
                if d.capturing() {
                    "on"
                } else {
                    "off: needs root/CAP_NET_RAW"
                },
                match d.firewall_name() {
                    "dry-run" => "dry-run, needs root/CAP_NET_ADMIN and nftables or iptables",
                    name => name,
                }
            ),
            None => println!("  SYN defense  off"),
        }
        if let (true, Some(t)) = (made_up_token, &token) {
            println!(
                "  admin token  {}  (PALISADE_ADMIN_TOKEN chooses your own)",
                t.expose()
            );
        }
        println!();
        println!("Try it: 150 requests in a row from one client; about 50 get 429 (limit 100/s):");
        // -k: a certificate given with --tls-cert is likely self-signed here.
        let insecure = if tls { "k" } else { "" };
        println!(
            "  curl -s{insecure} -o /dev/null -w '%{{http_code}}\\n' '{scheme}://{proxy}/?[1-150]' | sort | uniq -c"
        );
        // The breaker's 10 s window would still hold the burst's 100
        // successes, and 60 % failures would take 150 more requests.
        println!(
            "A failing upstream trips the circuit breaker (5 requests, 60 % failures, in a 10 s window;"
        );
        println!("the wait lets the burst above leave the window):");
        println!(
            "  sleep 10; for i in $(seq 8); do curl -s{insecure} -o /dev/null -w '%{{http_code}} ' {scheme}://{proxy}/status/500; done; echo"
        );
        println!(
            "  -> five 500s, then 503 without calling the upstream for 30 s: curl -s http://{admin}/api/v1/breakers"
        );
        println!("Stop with Ctrl-C (twice to skip the drain delay).");
    }
    terminate.recv().await;
    tracing::info!("shutdown requested: draining");
    notify::stopping();
    running.drain(terminate.recv()).await;
    if let Some((_, task)) = demo {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(unix)]
type Stream = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Stream = Option<()>;

/// The daemon's signal streams, registered with the OS at `install`:
/// from then on a signal is queued for us, never the default action.
struct Signals {
    hangup: Stream,
    /// SIGUSR1: reopen the access log.
    user1: Stream,
    terminate: Terminate,
}

/// SIGTERM and SIGINT, which mean the same: the first drains, a second
/// hurries the drain along.
struct Terminate {
    term: Stream,
    int: Stream,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let register = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("cannot listen for {name} ({e})");
                    None
                }
            };
            Self {
                hangup: register(SignalKind::hangup(), "SIGHUP"),
                user1: register(SignalKind::user_defined1(), "SIGUSR1"),
                terminate: Terminate {
                    term: register(SignalKind::terminate(), "SIGTERM"),
                    int: register(SignalKind::interrupt(), "SIGINT"),
                },
            }
        }
        #[cfg(not(unix))]
        Self {
            hangup: None,
            user1: None,
            terminate: Terminate {
                term: None,
                int: None,
            },
        }
    }
}

/// SIGHUP reloads the config file (errors are logged by the reload); with no
/// file (the quickstart) there is nothing to reload and the signal is logged.
fn on_sighup(hangup: Stream, app: std::sync::Arc<palisade_proxy::proxy::App>, reloadable: bool) {
    #[cfg(unix)]
    match hangup {
        Some(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if reloadable {
                        tracing::info!("SIGHUP: reloading config");
                        let _ = app.reload().await;
                    } else {
                        tracing::info!("SIGHUP: no config file to reload (quickstart)");
                    }
                }
            });
        }
        None => tracing::warn!("SIGHUP does not reload; use POST /api/v1/reload"),
    }
    #[cfg(not(unix))]
    let _ = (hangup, app, reloadable);
}

/// SIGUSR1 reopens the access log file (logrotate's `postrotate`).
fn on_sigusr1(user1: Stream, app: std::sync::Arc<palisade_proxy::proxy::App>) {
    #[cfg(unix)]
    if let Some(mut usr1) = user1 {
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                tracing::info!("SIGUSR1: reopening the access log");
                app.reopen_access_log();
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (user1, app);
}

impl Terminate {
    /// Completes on the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Stream) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.term) => {}
                () = recv(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (&self.term, &self.int);
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Warns when the config file holds a secret (the admin token, the cluster
/// key, a Redis password) and every user on the host may read it.
fn warn_if_others_read_secrets(
    path: &std::path::Path,
    config: &Config,
    overrides: &Overrides,
    env_token: bool,
) {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.permissions().mode() & 0o004 == 0 {
        return;
    }
    let mut held = Vec::new();
    if config.admin.token.is_some() && !env_token {
        held.push("admin.token");
    }
    if let Some(c) = &config.cluster {
        if c.key.is_some() && overrides.cluster_key.is_none() {
            held.push("cluster.key");
        }
        if overrides.redis.is_none() && c.redis.iter().any(|u| u.contains('@')) {
            held.push("a password in cluster.redis");
        }
    }
    if !held.is_empty() {
        tracing::warn!(
            "{} is readable by every user on this host and holds {}: chmod o-r it, or give them in \
             PALISADE_ADMIN_TOKEN, PALISADE_CLUSTER_KEY and PALISADE_REDIS_URL",
            path.display(),
            held.join(", ")
        );
    }
}

fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for an admin token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
