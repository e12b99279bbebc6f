//! `palisade store ...`: build, inspect, query and patch snapshot files.

use std::fs::File;
use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use palisade_core::{Clock as _, MonotonicClock};
use palisade_store::{Action, BuildOptions, Builder, Delta, Snapshot};

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Build a snapshot from CSV lines `ip_or_cidr,score[,reason[,action[,expires]]]`.
    Build {
        /// CSV input (`-` for stdin).
        #[arg(long)]
        input: PathBuf,
        /// Snapshot to write (replaced atomically).
        #[arg(long)]
        output: PathBuf,
        /// Feed position the snapshot starts at (deltas must follow it).
        #[arg(long, default_value_t = 0)]
        watermark: u64,
        /// Skip the prefilter (smaller file, slower misses).
        #[arg(long)]
        no_filter: bool,
    },
    /// Read one IP per line on stdin; print `IP SCORE`, or `IP -` when absent.
    Lookup {
        /// The snapshot.
        #[arg(long)]
        store: PathBuf,
    },
    /// Apply a delta file to a snapshot in place (atomically).
    ApplyDelta {
        /// The snapshot.
        #[arg(long)]
        store: PathBuf,
        /// The delta.
        #[arg(long)]
        delta: PathBuf,
        /// Rebuild the whole prefilter (folds in the overlay that deltas
        /// grow; happens by itself past 1/8 of the store).
        #[arg(long)]
        compact: bool,
    },
    /// Print a snapshot's header facts.
    Info {
        /// The snapshot.
        file: PathBuf,
    },
}

pub fn run(cmd: StoreCommand) -> anyhow::Result<bool> {
    match cmd {
        StoreCommand::Build {
            input,
            output,
            watermark,
            no_filter,
        } => build(&input, &output, watermark, !no_filter).map(|()| true),
        StoreCommand::Lookup { store } => lookup(&store),
        StoreCommand::ApplyDelta {
            store,
            delta,
            compact,
        } => apply(&store, &delta, compact).map(|()| true),
        StoreCommand::Info { file } => {
            let s = Snapshot::open(&file)?;
            print_info(&s);
            Ok(true)
        }
    }
}

fn build(input: &Path, output: &Path, watermark: u64, filter: bool) -> anyhow::Result<()> {
    let clock = MonotonicClock::new();
    let mut builder = if input == Path::new("-") {
        Builder::from_csv(std::io::stdin().lock(), "stdin")?
    } else {
        let file = File::open(input).with_context(|| input.display().to_string())?;
        Builder::from_csv(
            BufReader::with_capacity(1 << 20, file),
            &input.display().to_string(),
        )?
    };
    builder.watermark(watermark);
    let parsed = Duration::from_nanos(clock.now());
    let snap = builder.finish(BuildOptions {
        filter,
        created_unix: palisade_core::unix_now(),
        ..BuildOptions::default()
    })?;
    snap.write_to(output)?;
    let info = snap.info();
    eprintln!(
        "{}: {} entries, {} bytes ({:.2} B/entry), parsed in {:.2?}, built and written in {:.2?}",
        output.display(),
        info.entries(),
        info.bytes,
        info.bytes as f64 / info.entries().max(1) as f64,
        parsed,
        Duration::from_nanos(clock.now()) - parsed,
    );
    Ok(())
}

fn lookup(store: &Path) -> anyhow::Result<bool> {
    let snap = Snapshot::open(store)?;
    let now = palisade_core::unix_now();
    let stdin = std::io::stdin().lock();
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut all_ok = true;
    for (i, line) in stdin.lines().enumerate() {
        let line = line.context("reading stdin")?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let Ok(ip) = text.parse::<IpAddr>() else {
            eprintln!("stdin:{}: {text:?} is not an IP address", i + 1);
            all_ok = false;
            continue;
        };
        match snap.lookup(ip, now) {
            Some(v) if v.action == Action::Score => writeln!(out, "{text} {}", v.score),
            Some(v) => writeln!(out, "{text} {} {}", v.score, v.action.as_str()),
            None => writeln!(out, "{text} -"),
        }
        .context("writing stdout")?;
    }
    out.flush().context("writing stdout")?;
    Ok(all_ok)
}

fn apply(store: &Path, delta: &Path, compact: bool) -> anyhow::Result<()> {
    let snap = Snapshot::open(store)?;
    let text = std::fs::read_to_string(delta).with_context(|| delta.display().to_string())?;
    let name = delta.display().to_string();
    let parsed = Delta::parse(&text, &name)?;
    let clock = MonotonicClock::new();
    let opts = BuildOptions {
        filter: snap.info().filter_bytes > 0,
        created_unix: palisade_core::unix_now(),
        compact,
    };
    match snap.apply(&parsed, &name, opts)? {
        None => eprintln!(
            "{}: already at watermark {} (delta ends at {}); unchanged",
            store.display(),
            snap.watermark(),
            parsed.to
        ),
        Some(next) => {
            next.write_to(store)?;
            eprintln!(
                "{}: {} operations applied, watermark {} -> {}, in {:.2?}",
                store.display(),
                parsed.ops.len(),
                parsed.from,
                parsed.to,
                Duration::from_nanos(clock.now())
            );
        }
    }
    Ok(())
}

fn print_info(s: &Snapshot) {
    let i = s.info();
    println!("source         {}", i.source);
    println!("watermark      {}", i.watermark);
    println!("created_unix   {}", i.created_unix);
    println!("ipv4           {}", i.ipv4);
    println!("ipv4_prefixes  {}", i.ipv4_prefixes);
    println!("ipv6           {}", i.ipv6);
    println!("ipv6_prefixes  {}", i.ipv6_prefixes);
    println!("verdicts       {} (index width {} B)", i.classes, i.class_width);
    println!("bytes          {}", i.bytes);
    println!("filter_bytes   {}", i.filter_bytes);
    println!("bytes/entry    {:.2}", i.bytes as f64 / i.entries().max(1) as f64);
}
