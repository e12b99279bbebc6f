//! The text form of entries, shared by CSV input and delta feeds:
//! `ip_or_cidr,score[,reason[,action[,expires]]]`.

use std::io::BufRead;

use ipnet::IpNet;

use crate::{Action, Builder, Error, Result};

/// Longest reason name accepted.
pub const MAX_REASON: usize = 64;

/// One parsed entry line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The address or network.
    pub net: IpNet,
    /// 0 (worst) to 100.
    pub score: u8,
    /// What to do with a match.
    pub action: Action,
    /// Free-form reason code (`""` for none).
    pub reason: &'a str,
    /// Unix seconds after which the entry lapses; 0 = never.
    pub expires: u64,
}

/// Parses an address or CIDR. Bare addresses are /32 or /128; IPv4-mapped
/// IPv6 addresses become IPv4 (lookups do the same). Host bits set in a
/// CIDR are an error: `10.0.0.1/8` is more likely a typo than a network.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if s.contains('/') {
        let net: IpNet = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        if net.trunc() != net {
            return Err(format!("{s:?} has host bits set; the network is {}", net.trunc()));
        }
        return Ok(net);
    }
    let ip: std::net::IpAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    Ok(IpNet::from(ip.to_canonical()))
}

/// Parses one line. Blank lines and `#` comments give `Ok(None)`.
pub fn parse_record(line: &str) -> Result<Option<Record<'_>>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split(',').map(str::trim);
    let net = parse_net(fields.next().unwrap_or_default())?;
    let score = fields
        .next()
        .ok_or("missing score (expected ip_or_cidr,score[,reason[,action[,expires]]])")?;
    let score: u8 = score
        .parse()
        .ok()
        .filter(|s| *s <= 100)
        .ok_or_else(|| format!("score {score:?} is not an integer 0-100"))?;
    let reason = fields.next().unwrap_or_default();
    if reason.len() > MAX_REASON {
        return Err(format!("reason is longer than {MAX_REASON} bytes"));
    }
    let action = fields.next().unwrap_or_default().parse::<Action>()?;
    let expires = match fields.next() {
        None | Some("") => 0,
        Some(e) => e
            .parse()
            .map_err(|_| format!("expires {e:?} is not Unix seconds"))?,
    };
    if let Some(extra) = fields.next() {
        return Err(format!("unexpected field {extra:?} (at most 5 fields)"));
    }
    Ok(Some(Record {
        net,
        score,
        action,
        reason,
        expires,
    }))
}

fn is_header(line: &str) -> bool {
    let first = line.split(',').next().unwrap_or_default().trim();
    matches!(first, "ip" | "ip_or_cidr" | "network" | "cidr")
}

impl Builder {
    /// Reads CSV lines into a builder. The first error stops the read and
    /// names the line; a header line (`ip,score,...`) is skipped.
    pub fn from_csv(input: impl BufRead, name: &str) -> Result<Self> {
        let mut b = Self::new();
        for (i, line) in input.lines().enumerate() {
            let lineno = i + 1;
            let line = line.map_err(|e| Error::Parse {
                path: name.to_owned(),
                line: lineno,
                why: e.to_string(),
            })?;
            if lineno == 1 && is_header(&line) {
                continue;
            }
            let parsed = parse_record(&line).map_err(|why| Error::Parse {
                path: name.to_owned(),
                line: lineno,
                why,
            })?;
            if let Some(r) = parsed {
                b.insert(r.net, r.score, r.action, r.reason, r.expires)?;
            }
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_short_lines_parse() {
        let r = parse_record("10.0.0.0/8, 5, botnet, deny, 1800000000")
            .unwrap()
            .unwrap();
        assert_eq!(r.net, "10.0.0.0/8".parse::<IpNet>().unwrap());
        assert_eq!(
            (r.score, r.action, r.reason, r.expires),
            (5, Action::Deny, "botnet", 1_800_000_000)
        );
        let r = parse_record("2001:db8::1,40").unwrap().unwrap();
        assert_eq!(r.net.prefix_len(), 128);
        assert_eq!((r.score, r.action, r.reason), (40, Action::Score, ""));
        assert_eq!(parse_record("  # comment").unwrap(), None);
        let mapped = parse_record("::ffff:192.0.2.7,1").unwrap().unwrap();
        assert_eq!(mapped.net, "192.0.2.7/32".parse::<IpNet>().unwrap());
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(parse_record("10.0.0.1/8,5").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse_record("10.0.0.1").unwrap_err().contains("missing score"));
        assert!(parse_record("10.0.0.1,101").unwrap_err().contains("0-100"));
        assert!(parse_record("nope,1").unwrap_err().contains("not an IP"));
        assert!(
            parse_record("10.0.0.1,1,r,block")
                .unwrap_err()
                .contains("unknown action")
        );
        assert!(
            parse_record("10.0.0.1,1,r,deny,soon")
                .unwrap_err()
                .contains("Unix seconds")
        );
        assert!(
            parse_record("10.0.0.1,1,r,deny,1,x")
                .unwrap_err()
                .contains("unexpected")
        );
    }

    #[test]
    fn csv_errors_name_the_line() {
        let text = "ip,score\n1.2.3.4,10\n\n1.2.3.5,abc\n";
        let err = Builder::from_csv(text.as_bytes(), "feed.csv")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "feed.csv:4: score \"abc\" is not an integer 0-100");
    }
}
