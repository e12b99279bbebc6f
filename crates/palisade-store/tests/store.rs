//! The store against a naive model: every answer must be exactly the most
//! specific live entry, through builds, files, deltas and swaps.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ipnet::IpNet;
use palisade_store::{Action, BuildOptions, Builder, Delta, Error, Op, Snapshot, StoreCell};
use proptest::prelude::*;

/// (score, action, reason, expires).
type Value = (u8, Action, String, u64);
/// One value per network; later inserts win.
type Model = HashMap<IpNet, Value>;

fn model_lookup(m: &Model, ip: IpAddr, now: u64) -> Option<(u8, Action, String)> {
    let ip = ip.to_canonical();
    let exact = m
        .iter()
        .filter(|(n, v)| n.contains(&ip) && n.prefix_len() == n.max_prefix_len() && (v.3 == 0 || now < v.3))
        .map(|(_, v)| (v.0, v.1, v.2.clone()))
        .next();
    if exact.is_some() {
        return exact;
    }
    // Prefixes: the most specific one decides, expired or not (documented).
    m.iter()
        .filter(|(n, _)| n.contains(&ip) && n.prefix_len() < n.max_prefix_len())
        .max_by_key(|(n, _)| n.prefix_len())
        .filter(|(_, v)| v.3 == 0 || now < v.3)
        .map(|(_, v)| (v.0, v.1, v.2.clone()))
}

fn answer(s: &Snapshot, ip: IpAddr, now: u64) -> Option<(u8, Action, String)> {
    s.lookup(ip, now)
        .map(|v| (v.score, v.action, s.reason(v.reason).to_owned()))
}

/// Addresses from a small space so that prefixes and exact entries collide.
fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u8..4, any::<u8>(), 20u8..=32)
            .prop_map(|(c, d, len)| { IpNet::new(IpAddr::from([10, 0, c, d]), len).unwrap().trunc() }),
        (0u16..4, any::<u16>(), 112u8..=128).prop_map(|(a, b, len)| {
            IpNet::new(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, a, b]), len)
                .unwrap()
                .trunc()
        }),
    ]
}

fn verdict() -> impl Strategy<Value = (u8, Action, String, u64)> {
    (
        0u8..=100,
        prop_oneof![Just(Action::Score), Just(Action::Deny), Just(Action::Allow)],
        prop_oneof![
            Just(String::new()),
            Just("spam".to_owned()),
            Just("tor".to_owned())
        ],
        prop_oneof![Just(0u64), Just(50u64), Just(500u64)],
    )
}

fn probes() -> Vec<IpAddr> {
    let mut v = Vec::new();
    for c in 0..5u8 {
        for d in (0..=255u8).step_by(3) {
            v.push(IpAddr::from([10, 0, c, d]));
        }
    }
    for a in 0..5u16 {
        for b in (0..=0xffffu16).step_by(4099) {
            v.push(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, a, b]));
        }
    }
    v.push("::ffff:10.0.1.3".parse().unwrap());
    v
}

fn build(entries: &[(IpNet, Value)], filter: bool) -> (Snapshot, Model) {
    let mut b = Builder::new();
    let mut m = Model::new();
    for (n, v) in entries {
        b.insert(*n, v.0, v.1, &v.2, v.3).unwrap();
        m.insert(*n, v.clone());
    }
    let opts = BuildOptions {
        filter,
        created_unix: 1,
        ..BuildOptions::default()
    };
    (b.finish(opts).unwrap(), m)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn lookups_match_the_model(entries in proptest::collection::vec((net(), verdict()), 0..60), now in prop_oneof![Just(49u64), Just(50), Just(500), 0u64..600]) {
        let (with_filter, model) = build(&entries, true);
        let (without, _) = build(&entries, false);
        for ip in probes() {
            let want = model_lookup(&model, ip, now);
            prop_assert_eq!(answer(&with_filter, ip, now), want.clone(), "{} with filter", ip);
            prop_assert_eq!(answer(&without, ip, now), want, "{} without filter", ip);
        }
    }

    #[test]
    fn deltas_match_the_model(
        base in proptest::collection::vec((net(), verdict()), 0..40),
        ops in proptest::collection::vec((net(), proptest::option::of(verdict())), 0..40),
    ) {
        let (snap, mut model) = build(&base, true);
        let delta = Delta {
            from: 0,
            to: 7,
            ops: ops
                .iter()
                .map(|(n, v)| match v {
                    Some(v) => Op::Upsert { net: *n, score: v.0, action: v.1, reason: v.2.clone(), expires: v.3 },
                    None => Op::Delete(*n),
                })
                .collect(),
        };
        for (n, v) in &ops {
            match v {
                Some(v) => { model.insert(*n, v.clone()); }
                None => { model.remove(n); }
            }
        }
        // Through the text form, as a feed would deliver it.
        let parsed = Delta::parse(&delta.encode(), "delta").unwrap();
        let next = snap.apply(&parsed, "delta", BuildOptions::default()).unwrap().unwrap();
        prop_assert_eq!(next.watermark(), 7);
        for ip in probes() {
            prop_assert_eq!(answer(&next, ip, 100), model_lookup(&model, ip, 100), "{}", ip);
        }
        // The entries listing round-trips into an identical store.
        let mut again = Builder::new();
        for (n, v) in next.entries() {
            again.insert(n, v.score, v.action, next.reason(v.reason), v.expires).unwrap();
        }
        let again = again.finish(BuildOptions::default()).unwrap();
        for ip in probes() {
            prop_assert_eq!(answer(&again, ip, 100), answer(&next, ip, 100));
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("palisade-store-{name}-{}.pstore", std::process::id()))
}

fn sample() -> Snapshot {
    let csv =
        "ip,score,reason\n198.51.100.7,10,spam\n203.0.113.0/24,0,botnet,deny\n2001:db8::/64,90,,allow\n";
    Builder::from_csv(csv.as_bytes(), "t.csv")
        .unwrap()
        .finish(BuildOptions::default())
        .unwrap()
}

#[test]
fn a_written_file_opens_and_answers_the_same() {
    let path = tmp("roundtrip");
    let s = sample();
    s.write_to(&path).unwrap();
    let opened = Snapshot::open(&path).unwrap();
    for ip in ["198.51.100.7", "203.0.113.9", "2001:db8::5", "192.0.2.1"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(answer(&opened, ip, 0), answer(&s, ip, 0), "{ip}");
    }
    assert_eq!(
        answer(&opened, "203.0.113.9".parse().unwrap(), 0),
        Some((0, Action::Deny, "botnet".into()))
    );
    assert_eq!(opened.info().entries(), 3);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn damaged_files_are_refused_with_the_reason() {
    let bytes = sample().as_bytes().to_vec();
    for (at, what) in [
        (0, "magic"),
        (20, "header checksum"),
        (bytes.len() - 1, "body checksum"),
    ] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x40;
        let err = Snapshot::from_bytes(&bad).unwrap_err().to_string();
        assert!(err.contains(what), "flipping byte {at}: {err}");
    }
    let err = Snapshot::from_bytes(&bytes[..bytes.len() - 16])
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    let path = tmp("missing");
    assert!(matches!(Snapshot::open(&path), Err(Error::Io { .. })));
}

#[test]
fn deltas_out_of_order_are_refused_and_old_ones_are_no_ops() {
    let s = sample();
    let d = |from, to| Delta {
        from,
        to,
        ops: vec![Op::Delete("198.51.100.7/32".parse().unwrap())],
    };
    let next = s.apply(&d(0, 5), "a", BuildOptions::default()).unwrap().unwrap();
    assert!(
        next.apply(&d(0, 5), "a", BuildOptions::default())
            .unwrap()
            .is_none()
    );
    let err = next.apply(&d(6, 9), "gap", BuildOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "gap: delta 6→9 does not follow watermark 5");
}

#[test]
fn the_cell_persists_deltas_and_keeps_serving_on_bad_ones() {
    let path = tmp("cell");
    sample().write_to(&path).unwrap();
    let cell = StoreCell::open(&path).unwrap();
    let ip: IpAddr = "198.51.100.7".parse().unwrap();
    let good = Delta {
        from: 0,
        to: 1,
        ops: vec![Op::Delete("198.51.100.7/32".parse().unwrap())],
    }
    .encode();
    let corrupt = good.replace("from=0", "from=1").replace("to=1", "to=2");
    assert!(
        cell.apply_delta(&corrupt[..corrupt.len() - 5], "feed", BuildOptions::default())
            .is_err()
    );
    assert!(cell.lookup(ip, 0).is_some(), "a rejected delta changed the data");
    let st = cell.status();
    assert_eq!((st.applied, st.rejected), (0, 1));
    assert!(st.last_error.unwrap().contains("feed:"));
    assert!(cell.apply_delta(&good, "feed", BuildOptions::default()).unwrap());
    assert!(cell.lookup(ip, 0).is_none());
    // Persisted: a fresh open sees the new watermark and data.
    let reopened = Snapshot::open(&path).unwrap();
    assert_eq!(reopened.watermark(), 1);
    assert!(reopened.lookup(ip, 0).is_none());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn readers_never_fail_or_see_a_half_applied_delta_during_swaps() {
    // Two addresses flip together in every delta; a reader must always see
    // them in the same state.
    let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
    let mut builder = Builder::new();
    for i in 0..50_000u32 {
        builder
            .insert(
                IpNet::from(IpAddr::from((0x0a00_0000 + i * 7).to_be_bytes())),
                50,
                Action::Score,
                "",
                0,
            )
            .unwrap();
    }
    let cell = Arc::new(StoreCell::new(
        builder.finish(BuildOptions::default()).unwrap(),
        None,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (cell, stop, reads) = (cell.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let snap = cell.load();
                    let (x, y) = (
                        snap.lookup(a, 0).map(|v| v.score),
                        snap.lookup(b, 0).map(|v| v.score),
                    );
                    assert_eq!(x, y, "half-applied delta visible");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in 0..20u64 {
        let op = |ip: IpAddr| {
            if w % 2 == 0 {
                Op::Upsert {
                    net: IpNet::from(ip),
                    score: w as u8,
                    action: Action::Score,
                    reason: String::new(),
                    expires: 0,
                }
            } else {
                Op::Delete(IpNet::from(ip))
            }
        };
        let d = Delta {
            from: w,
            to: w + 1,
            ops: vec![op(a), op(b)],
        };
        assert!(
            cell.apply_delta(&d.encode(), "swap", BuildOptions::default())
                .unwrap()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("a reader saw an inconsistent snapshot");
    }
    assert_eq!(cell.status().applied, 20);
    assert!(reads.load(Ordering::Relaxed) > 0);
}

#[test]
fn deltas_grow_an_overlay_filter_then_rebuild_it() {
    let ip = |i: u32| IpNet::from(IpAddr::from((0x0a00_0000 + i * 13).to_be_bytes()));
    let mut b = Builder::new();
    for i in 0..10_000 {
        b.insert(ip(i), 40, Action::Score, "", 0).unwrap();
    }
    let mut snap = b.finish(BuildOptions::default()).unwrap();
    let main_bytes = snap.info().filter_bytes;
    let mut next = 10_000u32;
    let mut saw_overlay = false;
    let mut saw_rebuild = false;
    for w in 0..12u64 {
        let ops = (0..500)
            .map(|k| Op::Upsert {
                net: ip(next + k),
                score: 1,
                action: Action::Score,
                reason: String::new(),
                expires: 0,
            })
            .chain([Op::Delete(ip(w as u32))])
            .collect();
        next += 500;
        snap = snap
            .apply(
                &Delta {
                    from: w,
                    to: w + 1,
                    ops,
                },
                "d",
                BuildOptions::default(),
            )
            .unwrap()
            .unwrap();
        let info = snap.info();
        saw_overlay |= info.overlay_keys > 0;
        saw_rebuild |= saw_overlay && info.overlay_keys == 0;
        // No false negatives: every key ever added is found, deletes are gone.
        for i in 12..next {
            assert_eq!(
                snap.lookup(ip(i).addr(), 0).map(|v| v.score),
                Some(if i < 10_000 { 40 } else { 1 }),
                "key {i} after delta {w}"
            );
        }
        assert!(snap.lookup(ip(w as u32).addr(), 0).is_none());
        assert!(info.filter_bytes >= main_bytes);
    }
    assert!(saw_overlay, "deltas never used the overlay");
    assert!(
        saw_rebuild,
        "the overlay never triggered a full rebuild (limit 4096 keys)"
    );
    // The overlay survives a file round trip.
    let reopened = Snapshot::from_bytes(snap.as_bytes()).unwrap();
    assert_eq!(reopened.info().overlay_keys, snap.info().overlay_keys);
    for i in 12..next {
        assert!(
            reopened.lookup(ip(i).addr(), 0).is_some(),
            "key {i} lost in the round trip"
        );
    }
}
