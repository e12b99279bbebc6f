//! Delta feeds: versioned insert/update/delete operations that
//! move a store from one watermark to the next.
//!
//! ```text
//! palisade-delta 1 from=41 to=42
//! +,198.51.100.7,10,spam
//! +,203.0.113.0/24,0,botnet,deny
//! -,192.0.2.1
//! end ops=3 crc32=1c291ca3
//! ```
//!
//! The CRC-32 covers every byte before the `end` line, and `ops` counts the
//! operations, so a truncated or damaged delta is rejected whole.

use std::fmt::Write as _;

use ipnet::IpNet;

use crate::csv::{parse_net, parse_record};
use crate::{Action, Error, Result};

const MAGIC: &str = "palisade-delta 1";

/// One operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace an entry.
    Upsert {
        /// The address or network.
        net: IpNet,
        /// 0–100.
        score: u8,
        /// What to do with a match.
        action: Action,
        /// Reason code.
        reason: String,
        /// Unix seconds; 0 = never.
        expires: u64,
    },
    /// Remove the entry for exactly this network (no-op when absent).
    Delete(IpNet),
}

/// A parsed, verified delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The watermark the delta applies on top of.
    pub from: u64,
    /// The watermark after it.
    pub to: u64,
    /// In order; later operations on the same network win.
    pub ops: Vec<Op>,
}

fn field(header: &str, name: &str) -> Option<u64> {
    header
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

impl Delta {
    /// Parses and verifies a delta. `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let err = |line: usize, why: String| Error::Parse {
            path: source.to_owned(),
            line,
            why,
        };
        let mut lines = text.split_inclusive('\n');
        let header = lines.next().unwrap_or_default();
        if !header.starts_with(MAGIC) {
            return Err(err(
                1,
                format!("not a delta: the first line must start with {MAGIC:?}"),
            ));
        }
        let (Some(from), Some(to)) = (field(header, "from"), field(header, "to")) else {
            return Err(err(1, "the header needs from=N and to=N".into()));
        };
        if to <= from {
            return Err(err(1, format!("to={to} must be greater than from={from}")));
        }
        let mut ops = Vec::new();
        let mut offset = header.len();
        for (i, raw) in lines.enumerate() {
            let lineno = i + 2;
            let line = raw.trim_end_matches(['\n', '\r']);
            if let Some(trailer) = line.strip_prefix("end ") {
                let count =
                    field(trailer, "ops").ok_or_else(|| err(lineno, "end line needs ops=N".into()))?;
                let crc = trailer
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("crc32="))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .ok_or_else(|| err(lineno, "end line needs crc32=HEX".into()))?;
                if count != ops.len() as u64 {
                    return Err(err(
                        lineno,
                        format!("end says {count} operations, found {}", ops.len()),
                    ));
                }
                let actual = crc32fast::hash(&text.as_bytes()[..offset]);
                if actual != crc {
                    return Err(err(
                        lineno,
                        format!("checksum mismatch (end says {crc:08x}, content is {actual:08x})"),
                    ));
                }
                if text[offset + raw.len()..].trim().is_empty() {
                    return Ok(Self { from, to, ops });
                }
                return Err(err(lineno + 1, "content after the end line".into()));
            }
            offset += raw.len();
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let op = if let Some(rest) = line.strip_prefix("+,") {
                let r = parse_record(rest)
                    .map_err(|why| err(lineno, why))?
                    .ok_or_else(|| err(lineno, "empty upsert".into()))?;
                Op::Upsert {
                    net: r.net,
                    score: r.score,
                    action: r.action,
                    reason: r.reason.to_owned(),
                    expires: r.expires,
                }
            } else if let Some(rest) = line.strip_prefix("-,") {
                Op::Delete(parse_net(rest).map_err(|why| err(lineno, why))?)
            } else {
                return Err(err(
                    lineno,
                    "an operation starts with \"+,\" (upsert) or \"-,\" (delete)".into(),
                ));
            };
            ops.push(op);
        }
        Err(err(
            text.lines().count() + 1,
            "truncated: no end line (the delta is incomplete)".into(),
        ))
    }

    /// The text form, with a correct trailer.
    pub fn encode(&self) -> String {
        let mut s = format!("{MAGIC} from={} to={}\n", self.from, self.to);
        for op in &self.ops {
            // Writing to a String cannot fail.
            let _ = match op {
                Op::Upsert {
                    net,
                    score,
                    action,
                    reason,
                    expires,
                } => writeln!(s, "+,{net},{score},{reason},{},{expires}", action.as_str()),
                Op::Delete(net) => writeln!(s, "-,{net}"),
            };
        }
        let crc = crc32fast::hash(s.as_bytes());
        let _ = writeln!(s, "end ops={} crc32={crc:08x}", self.ops.len());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Delta {
        Delta {
            from: 41,
            to: 42,
            ops: vec![
                Op::Upsert {
                    net: "198.51.100.7/32".parse().unwrap(),
                    score: 10,
                    action: Action::Score,
                    reason: "spam".into(),
                    expires: 0,
                },
                Op::Delete("192.0.2.0/24".parse().unwrap()),
            ],
        }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let d = sample();
        assert_eq!(Delta::parse(&d.encode(), "d").unwrap(), d);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let text = sample().encode();
        for cut in 0..text.trim_end().len() {
            assert!(
                Delta::parse(&text[..cut], "d").is_err(),
                "accepted a delta cut at byte {cut}"
            );
        }
    }

    #[test]
    fn a_flipped_byte_is_rejected() {
        let text = sample().encode().replace("198.51.100.7", "198.51.100.8");
        let err = Delta::parse(&text, "feed").unwrap_err().to_string();
        assert!(err.starts_with("feed:4: checksum mismatch"), "{err}");
    }

    #[test]
    fn a_bad_operation_names_its_line() {
        let mut d = sample().encode();
        d = d.replace("-,192.0.2.0/24", "-,192.0.2.1/24");
        let err = Delta::parse(&d, "feed").unwrap_err().to_string();
        assert!(err.starts_with("feed:3: "), "{err}");
    }
}
