//! JA4 cost per TLS connection: a real ClientHello (Chromium 148, 1.8 KB
//! with its post-quantum key share) parsed and fingerprinted.
//!
//! Run: `cargo bench -p palisade-core --bench ja4`
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_core::ja4::ja4;

const HELLO: &[u8] = include_bytes!("../testdata/chromium148-hello.bin");

fn bench(c: &mut Criterion) {
    assert_eq!(
        ja4(HELLO).unwrap().as_str(),
        "t13d1516h2_8daaf6152771_d8a2da3f94cd"
    );
    c.bench_function("ja4/chromium148", |b| b.iter(|| ja4(black_box(HELLO))));
}

criterion_group!(benches, bench);
criterion_main!(benches);
