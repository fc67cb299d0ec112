//! Masking engine throughput on mixed text rows, one core.
//!
//! `cargo bench -p gatehouse-masking` prints time per batch and throughput
//! (MB/s = bytes of row values scanned per second on one core), for rows
//! with no sensitive value (the common case) and rows where a third of the
//! values hold one.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gatehouse_masking::{Config, Counts, Masker};

/// Row values as a customer table would return them: names, addresses,
/// free text, numbers, dates; `sensitive` of every 3 rows carries an e-mail,
/// a card number or an IBAN.
fn rows(n: usize, sensitive: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let v = match (sensitive, i % 6) {
            (true, 0) => format!("customer{i}@example.com"),
            (true, 2) => "4242 4242 4242 4242".to_string(),
            (true, 4) => "DE89 3704 0044 0532 0130 00".to_string(),
            (_, 1) => format!("{i} Market Street, Springfield, order {}", i * 7),
            (_, 3) => "The quick brown fox jumps over the lazy dog; delivered on time, signed by reception.".to_string(),
            (_, 5) => format!("2026-11-{:02} 12:{:02}:00+00", i % 28 + 1, i % 60),
            _ => format!("Ada Lovelace {i}"),
        };
        out.push(v.into_bytes());
    }
    out
}

fn bench(c: &mut Criterion) {
    let Ok(m) = Masker::new(&Config::default()) else {
        eprintln!("the built-in detectors do not compile");
        return;
    };
    for (name, sensitive) in [("clean rows", false), ("a third sensitive", true)] {
        let data = rows(10_000, sensitive);
        let bytes: usize = data.iter().map(Vec::len).sum();
        let mut g = c.benchmark_group("mask");
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("{name}, value by value"), |b| {
            b.iter(|| {
                let mut counts = Counts::new();
                let mut changed = 0usize;
                for v in &data {
                    if m.mask(std::hint::black_box(v), &mut counts).is_some() {
                        changed += 1;
                    }
                }
                changed
            })
        });
        // Rows of 6 columns, one scan per row (what the data path does).
        let rows: Vec<Vec<&[u8]>> = data
            .chunks(6)
            .map(|r| r.iter().map(Vec::as_slice).collect())
            .collect();
        g.bench_function(format!("{name}, row by row"), |b| {
            b.iter(|| {
                let mut counts = Counts::new();
                let mut changed = 0usize;
                for r in &rows {
                    if !m
                        .mask_values(std::hint::black_box(r), &mut counts)
                        .is_empty()
                    {
                        changed += 1;
                    }
                }
                changed
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
