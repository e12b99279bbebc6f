//! `palisade bans list|add|del`: the running daemon's kernel bans, through
//! its admin API.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;

#[derive(clap::Args)]
pub struct BansArgs {
    /// The daemon's admin address.
    #[arg(long, default_value = "127.0.0.1:9090", global = true)]
    admin: SocketAddr,
    /// Admin bearer token (changes need it).
    #[arg(long, env = "PALISADE_ADMIN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: BansCommand,
}

#[derive(Subcommand)]
enum BansCommand {
    /// Active bans: network, reason, seconds left, SYN rate, ban latency.
    List,
    /// Ban an address or CIDR in the kernel.
    Add {
        /// Address or CIDR.
        net: String,
        /// How long (default: syn.ban_duration).
        #[arg(long)]
        duration: Option<String>,
    },
    /// Lift a ban.
    Del {
        /// Address or CIDR, as listed.
        net: String,
    },
}

fn request(args: &BansArgs, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&args.admin, Duration::from_secs(5))
        .with_context(|| format!("connecting to the admin API at {}", args.admin))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = args
        .token
        .as_deref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        args.admin,
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP response")?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}

pub fn run(args: BansArgs) -> anyhow::Result<()> {
    let (status, body) = match &args.command {
        BansCommand::List => request(&args, "GET", "/api/v1/bans", "")?,
        BansCommand::Add { net, duration } => {
            let body = serde_json::json!({ "ip": net, "duration": duration }).to_string();
            request(&args, "POST", "/api/v1/bans", &body)?
        }
        BansCommand::Del { net } => request(
            &args,
            "DELETE",
            &format!("/api/v1/bans/{}", net.replace('/', "%2F")),
            "",
        )?,
    };
    let value: serde_json::Value =
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body.clone()));
    if status != 200 {
        let why = value["error"].as_str().map_or(body.as_str(), |e| e);
        bail!("admin API answered {status}: {why}");
    }
    match args.command {
        BansCommand::List => {
            let bans = value.as_array().cloned().unwrap_or_default();
            println!(
                "{:<43} {:<10} {:>9} {:>9} {:>10}",
                "NETWORK", "REASON", "LEFT_S", "SYN/S", "LATENCY_MS"
            );
            let now = palisade_core::unix_now();
            for b in bans {
                println!(
                    "{:<43} {:<10} {:>9} {:>9} {:>10}",
                    b["net"].as_str().unwrap_or("?"),
                    b["reason"].as_str().unwrap_or("?"),
                    b["until"].as_u64().map_or(0, |u| u.saturating_sub(now)),
                    b["rate"].as_u64().unwrap_or(0),
                    b["latency_ms"]
                        .as_f64()
                        .map_or_else(|| "-".into(), |l| format!("{l:.1}")),
                );
            }
        }
        _ => println!("{value}"),
    }
    Ok(())
}
