//! Forged records in the cluster's Redis: what someone who can write to
//! Redis but does not hold the cluster key would plant. Bans of the whole
//! Internet and of the legitimate clients, scores of 0 for them, a
//! heartbeat that is not a number, and counts that would use up every
//! legitimate client's shared window. Each has the shape of a real record
//! and a MAC that is not one, so a node must refuse it for its MAC (and
//! count it as unauthenticated), not for its form, and keep serving.

use std::net::Ipv4Addr;

use redis::Commands as _;

/// The node name forged records claim: no real node has it.
pub const MALLORY: &str = "drill-mallory";

/// A MAC of the right length and alphabet that signs nothing.
const BOGUS_MAC: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The forged records for one cluster.
#[derive(Clone, Debug)]
pub struct Forgery {
    /// `cluster.key_prefix` of the config under drill.
    pub prefix: String,
    /// Addresses of legitimate clients, the victims of the forgery.
    pub victims: Vec<Ipv4Addr>,
    /// Names of the shared windows (limits) whose counts to forge.
    pub windows: Vec<String>,
    /// Now, Unix milliseconds: forged records claim to be fresh.
    pub now_ms: u64,
}

/// What [`Forgery::plant`] wrote, to take it out again.
#[derive(Clone, Debug, Default)]
pub struct Planted {
    /// `(hash, field)` pairs written.
    pub fields: Vec<(String, String)>,
    /// IDs of entries added to the events stream.
    pub events: Vec<String>,
}

impl Forgery {
    fn key(&self, part: &str) -> String {
        format!("{{{}}}:{part}", self.prefix)
    }

    /// Hash fields to set: `(hash, field, value)`.
    pub fn fields(&self) -> Vec<(String, String, String)> {
        let (bans, rep, nodes) = (self.key("bans"), self.key("rep"), self.key("nodes"));
        let ban = self.ban_value();
        let score = self.score_value();
        let mut out = vec![
            (bans.clone(), "0.0.0.0/0".to_owned(), format!("{ban} {BOGUS_MAC}")),
            (nodes, MALLORY.to_owned(), "not-a-number".to_owned()),
        ];
        let sec = self.now_ms / 1_000;
        for v in &self.victims {
            let net = format!("{v}/32");
            out.push((bans.clone(), net.clone(), format!("{ban} {BOGUS_MAC}")));
            out.push((rep.clone(), net, format!("{score} {BOGUS_MAC}")));
            for w in &self.windows {
                for s in [sec, sec.saturating_sub(1), sec + 1] {
                    let key = format!("{}:rc:{{{w}:{v}}}:{s}", self.prefix);
                    out.push((key, MALLORY.to_owned(), format!("4000000000 {BOGUS_MAC}")));
                }
            }
        }
        out
    }

    /// Events-stream entries to add, each a list of field-value pairs.
    pub fn events(&self) -> Vec<Vec<(String, String)>> {
        let (ban, score) = (self.ban_value(), self.score_value());
        let nets =
            std::iter::once("0.0.0.0/0".to_owned()).chain(self.victims.iter().map(|v| format!("{v}/32")));
        nets.flat_map(|net| {
            let mut both = vec![("ban", ban.clone())];
            if net != "0.0.0.0/0" {
                both.push(("score", score.clone()));
            }
            both.into_iter().map(move |(kind, v)| {
                vec![
                    ("node".to_owned(), MALLORY.to_owned()),
                    ("net".to_owned(), net.clone()),
                    ("k".to_owned(), kind.to_owned()),
                    ("v".to_owned(), v),
                    ("mac".to_owned(), BOGUS_MAC.to_owned()),
                ]
            })
        })
        .collect()
    }

    /// A ban for ten minutes from now, as a real node writes one.
    fn ban_value(&self) -> String {
        format!("- {} {}", self.now_ms / 1_000 + 600, self.now_ms)
    }

    /// A score of 0, the worst there is.
    fn score_value(&self) -> String {
        format!("0 0 {}", self.now_ms)
    }

    /// Writes every forged record into the Redis at `url`.
    pub fn plant(&self, url: &str) -> redis::RedisResult<Planted> {
        let mut c = redis::Client::open(url)?.get_connection()?;
        let mut planted = Planted::default();
        for (hash, field, value) in self.fields() {
            let () = c.hset(&hash, &field, value)?;
            planted.fields.push((hash, field));
        }
        let stream = self.key("events");
        for entry in self.events() {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&stream).arg("*");
            for (k, v) in &entry {
                cmd.arg(k).arg(v);
            }
            let id: String = cmd.query(&mut c)?;
            planted.events.push(id);
        }
        Ok(planted)
    }

    /// Takes out what [`Self::plant`] wrote, so the drill leaves the
    /// cluster's Redis as it found it.
    pub fn remove(&self, url: &str, planted: &Planted) -> redis::RedisResult<()> {
        let mut c = redis::Client::open(url)?.get_connection()?;
        for (hash, field) in &planted.fields {
            let _: u64 = c.hdel(hash, field)?;
        }
        if !planted.events.is_empty() {
            let _: u64 = redis::cmd("XDEL")
                .arg(self.key("events"))
                .arg(&planted.events)
                .query(&mut c)?;
        }
        Ok(())
    }
}

/// `palisade_cluster_records_rejected_total{reason="unauthenticated"}` in
/// a Prometheus text exposition; 0 when absent.
pub fn unauthenticated(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("palisade_cluster_records_rejected_total{reason=\"unauthenticated\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn forgery() -> Forgery {
        Forgery {
            prefix: "palisade".to_owned(),
            victims: vec![Ipv4Addr::new(198, 18, 9, 10), Ipv4Addr::new(198, 18, 9, 11)],
            windows: vec!["per_ip".to_owned()],
            now_ms: 1_796_300_000_000,
        }
    }

    #[test]
    fn records_have_the_form_of_real_ones_and_a_mac_that_signs_nothing() {
        let f = forgery();
        let real_mac = palisade_proxy::cluster::record_mac(b"any cluster key", &["x"]);
        assert_eq!(BOGUS_MAC.len(), real_mac.len());
        let fields = f.fields();
        // The /0, the heartbeat; per victim a ban, a score, 3 seconds of one window.
        assert_eq!(fields.len(), 2 + 2 * (2 + 3));
        for (hash, field, value) in &fields {
            let parts = value.split(' ').count();
            match hash.as_str() {
                "{palisade}:bans" => assert_eq!(parts, 4, "{field} {value}"),
                "{palisade}:rep" => assert_eq!(parts, 4, "{field} {value}"),
                "{palisade}:nodes" => assert_eq!(value, "not-a-number"),
                k => {
                    assert!(k.starts_with("palisade:rc:{per_ip:198.18.9.1"), "{k}");
                    assert_eq!(parts, 2, "{value}");
                }
            }
        }
        // A ban of the /0 and, per victim, a ban and a score.
        assert_eq!(f.events().len(), 1 + 2 * 2);
    }

    #[test]
    fn unauthenticated_reads_the_counter() {
        let text = "# TYPE x counter\npalisade_cluster_records_rejected_total{reason=\"stale\"} 9\n\
                    palisade_cluster_records_rejected_total{reason=\"unauthenticated\"} 17\n";
        assert_eq!(unauthenticated(text), 17);
        assert_eq!(unauthenticated(""), 0);
    }
}
