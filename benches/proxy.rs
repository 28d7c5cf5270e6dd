//! One step of the connection state machine: a chunk received, forwarded
//! and its send completed, as the worker drives it for every packet.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ringpen::dataplane::proxy::{Op, Proxy, Side};

fn forward_one_chunk(c: &mut Criterion) {
    let mut proxy = Proxy::new(false, false);
    let mut ops = Vec::with_capacity(16);
    proxy.start(&mut ops);
    c.bench_function("proxy: recv + send completion of one chunk", |b| {
        b.iter(|| {
            ops.clear();
            proxy.on_recv(Side::Client, black_box(1448), Some(7), true, &mut ops);
            proxy.on_send(Side::Backend, black_box(1448), &mut ops);
            debug_assert_eq!(ops.last(), Some(&Op::Release(7)));
            black_box(&ops);
        })
    });
}

criterion_group!(benches, forward_one_chunk);
criterion_main!(benches);
