//! `palisade store ...`: build, inspect, query and patch snapshot files.

use std::fs::File;
use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use palisade_core::{Clock as _, MonotonicClock};
use palisade_store::sign::{PublicKey, SigningKey, signature_path};
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
    /// Make an Ed25519 key pair for signing a feed: the private key goes to
    /// a new file (mode 0600, never overwritten), the public key (for
    /// `store.feed_public_key`) to stdout.
    Keygen {
        /// The private key file to create (PKCS#8 PEM).
        #[arg(long)]
        output: PathBuf,
    },
    /// Sign a delta (or any file): writes FILE.sig next to it, replaced
    /// atomically. Publish FILE first, then FILE.sig.
    Sign {
        /// The file to sign.
        file: PathBuf,
        /// The private key (from `store keygen`, or `openssl genpkey -algorithm ed25519`).
        #[arg(long)]
        key: PathBuf,
        /// Where the signature goes (default: FILE.sig).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Check FILE against its signature as the daemon would: exit 0 when it
    /// verifies, 1 otherwise.
    Verify {
        /// The signed file.
        file: PathBuf,
        /// The public key, base64 or hex (as `store keygen` prints it).
        #[arg(long)]
        public_key: String,
        /// The signature file (default: FILE.sig).
        #[arg(long)]
        signature: Option<PathBuf>,
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
        StoreCommand::Keygen { output } => keygen(&output).map(|()| true),
        StoreCommand::Sign { file, key, output } => {
            let output = output.unwrap_or_else(|| signature_path(&file));
            sign(&file, &key, &output).map(|()| true)
        }
        StoreCommand::Verify {
            file,
            public_key,
            signature,
        } => {
            let signature = signature.unwrap_or_else(|| signature_path(&file));
            verify(&file, &public_key, &signature)
        }
    }
}

fn keygen(output: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let (key, pem) = SigningKey::generate().map_err(anyhow::Error::msg)?;
    // create_new: an existing key (or a planted symlink) is never overwritten.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(output)
        .with_context(|| output.display().to_string())?;
    f.write_all(pem.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| output.display().to_string())?;
    println!("{}", key.public_key());
    eprintln!(
        "{}: private key written (mode 0600); keep it off the feed host. \
         The public key above goes in store.feed_public_key.",
        output.display()
    );
    Ok(())
}

fn sign(file: &Path, key: &Path, output: &Path) -> anyhow::Result<()> {
    let pem = std::fs::read_to_string(key).with_context(|| key.display().to_string())?;
    let key = SigningKey::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let body = std::fs::read(file).with_context(|| file.display().to_string())?;
    let sig = key.sign(&body);
    // Through a temporary file and a rename, so a poll never reads half a
    // signature; readable like any file published next to it.
    let mut tmp = output.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, &sig)
        .and_then(|()| std::fs::rename(&tmp, output))
        .with_context(|| output.display().to_string())?;
    eprintln!(
        "{}: signed {} bytes of {} (public key {})",
        output.display(),
        body.len(),
        file.display(),
        key.public_key()
    );
    Ok(())
}

fn verify(file: &Path, public_key: &str, signature: &Path) -> anyhow::Result<bool> {
    let key = PublicKey::parse(public_key).map_err(|e| anyhow::anyhow!("--public-key: {e}"))?;
    let body = std::fs::read(file).with_context(|| file.display().to_string())?;
    let sig = std::fs::read(signature).with_context(|| signature.display().to_string())?;
    match key.verify(&body, &sig) {
        Ok(()) => {
            println!("{}: signature ok", file.display());
            Ok(true)
        }
        Err(e) => {
            eprintln!("{}: {e} ({})", file.display(), signature.display());
            Ok(false)
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
