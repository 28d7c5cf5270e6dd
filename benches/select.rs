//! The per-connection cost of selection: the first choice plus the first
//! attempt for each policy, and the client table's lookup and insert.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ringpen::config::Mode;
use ringpen::select::client_table::ClientTable;
use ringpen::select::{first_choice, Attempts, Candidate, ClientKey, RoundRobin};

fn client(n: u32) -> ClientKey {
    ClientKey::Ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)))
}

/// Servers with varied load, weights and priorities, one in ten blacklisted,
/// so that every policy has to look at them all.
fn servers(count: usize) -> Vec<Candidate> {
    (0..count)
        .map(|i| Candidate {
            usable: true,
            blacklisted: i % 10 == 3,
            conns: (i as u32 * 7) % 13,
            max: 100,
            hard: 120,
            weight: 1 + (i as u32 % 4) * 50,
            prio: (i as u32 * 5) % 7,
            denied: false,
        })
        .collect()
}

fn policies() -> [(&'static str, Mode, bool); 5] {
    let rr = Mode {
        roundrobin: true,
        ..Mode::default()
    };
    [
        ("rr", rr, false),
        ("tracking", Mode::default(), true),
        ("hash", Mode { hash: true, ..rr }, false),
        ("weight", Mode { weight: true, ..rr }, false),
        ("prio", Mode { prio: true, ..rr }, false),
    ]
}

fn bench_selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("first_choice+attempt");
    for count in [3, 64] {
        let servers = servers(count);
        for (name, mode, tracked) in policies() {
            let rr = RoundRobin::new();
            let tracked = tracked.then_some(count / 2);
            let mut n = 0u32;
            group.bench_with_input(BenchmarkId::new(name, count), &servers, |b, servers| {
                b.iter(|| {
                    n = n.wrapping_add(1);
                    let first = first_choice(&mode, servers, client(n), 0, tracked, &rr);
                    let mut attempts = Attempts::new(first);
                    black_box(attempts.next(&mode, servers, tracked, None))
                })
            });
        }
    }
    group.finish();
}

/// A table of `size` slots, all occupied by clients `0..size` at time 1.
fn full_table(size: usize) -> ClientTable {
    let mut table = ClientTable::new(size, 0);
    for i in 0..size as u32 {
        table.visit(client(i), 1);
    }
    table
}

fn bench_client_table(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_table");
    for size in [2_048, 1_000_000] {
        let mut table = full_table(size);
        let mut n = 0u32;
        group.bench_function(BenchmarkId::new("visit_known", size), |b| {
            b.iter(|| {
                // A stride coprime with the size spreads lookups over the table.
                n = (n + 7_919) % size as u32;
                black_box(table.visit(client(n), 2))
            })
        });

        let mut table = full_table(size);
        let mut next = size as u32;
        group.bench_function(BenchmarkId::new("visit_new", size), |b| {
            b.iter(|| {
                // Every visit is a new client evicting the oldest slot.
                next = next.wrapping_add(1);
                black_box(table.visit(client(next), 2 + u64::from(next)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_selection, bench_client_table);
criterion_main!(benches);
