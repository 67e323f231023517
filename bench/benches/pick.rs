//! Choosing a node among 1,000 routable nodes, per policy. The target is
//! at most 1 µs per pick.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::BackendKind;
use coordinator::balancer::{ApiKind, Balancer, Candidate, Policy, RoutingTable};

use criterion::{criterion_group, criterion_main, Criterion};

/// 1,000 Ollama nodes that all serve the benchmarked model (the worst case
/// for least-busy, which looks at every holder), each with a few others.
fn fleet(nodes: u32) -> RoutingTable {
    let candidates = (0..nodes)
        .map(|n| Candidate {
            id: uuid::Uuid::from_u128(u128::from(n) + 1),
            name: std::sync::Arc::from(format!("node-{n}")),
            address: std::net::SocketAddr::from((
                [127, (n >> 16) as u8, (n >> 8) as u8, n as u8],
                11434,
            )),
            backend: BackendKind::Ollama,
            tls: false,
            runtime_version: Arc::from("0.5.7"),
            models: [
                "llama3.1:8b".to_owned(),
                format!("private-{n}"),
                "qwen2.5:7b".to_owned(),
            ]
            .iter()
            .map(|m| Arc::from(m.as_str()))
            .collect(),
            loaded_models: Arc::from([]),
            // Busy nodes everywhere, so least-busy cannot stop early.
            in_flight: Arc::new(AtomicU64::new(1 + u64::from(n % 7))),
            capacity: 0,
            traffic: Default::default(),
            host_header: coordinator::axum_http::HeaderValue::from_static("127.0.0.1:11434"),
        })
        .collect();
    RoutingTable::build(candidates, Vec::new())
}

fn pick(c: &mut Criterion) {
    let table = fleet(1_000);
    for (name, policy) in [
        ("round-robin", Policy::RoundRobin),
        ("least-busy", Policy::LeastBusy),
    ] {
        let balancer = Balancer::new(policy);
        // One attempt: what a request with --max-attempts 1 costs to route.
        c.bench_function(&format!("choose among 1000 nodes, {name}"), |b| {
            b.iter(|| {
                let plan = balancer.plan(
                    black_box(&table),
                    ApiKind::Ollama,
                    black_box("llama3.1:8b"),
                    None,
                    1,
                );
                black_box(plan.map(|plan| plan[0].in_flight.load(Ordering::Relaxed)))
            })
        });
        c.bench_function(
            &format!("plan of 3 attempts among 1000 nodes, {name}"),
            |b| {
                b.iter(|| {
                    black_box(balancer.plan(
                        black_box(&table),
                        ApiKind::Ollama,
                        black_box("llama3.1:8b"),
                        None,
                        3,
                    ))
                })
            },
        );
    }
}

/// Cache-aware: a 4,000-token prompt (16,000 bytes, about 63 blocks) among
/// 100 nodes, the index already holding 10,000 conversations. Making the
/// prompt's key and choosing are measured apart and together.
fn cache_aware(c: &mut Criterion) {
    use coordinator::balancer::prefix::PromptKey;
    use coordinator::balancer::CacheAware;
    let table = fleet(100);
    let balancer = Balancer::new(Policy::CacheAware(CacheAware::default()));
    let conversation = |n: u32, turns: usize| {
        let system = format!("[{{\"role\":\"system\",\"content\":\"assistant {n}: ")
            + &"be brief and exact. ".repeat(800);
        system + &",{\"role\":\"user\",\"content\":\"next\"}".repeat(turns) + "]"
    };
    for n in 0..10_000 {
        let key = PromptKey::of("llama3.1:8b", &[conversation(n, 1).as_bytes()]);
        let _ = balancer.plan(&table, ApiKind::Ollama, "llama3.1:8b", Some(&key), 1);
    }
    let prompt = conversation(4_242, 2);
    assert!(prompt.len() >= 16_000, "{} bytes", prompt.len());
    let key = PromptKey::of("llama3.1:8b", &[prompt.as_bytes()]);
    c.bench_function("cache-aware: key of a 4,000-token prompt", |b| {
        b.iter(|| {
            black_box(PromptKey::of(
                black_box("llama3.1:8b"),
                &[black_box(prompt.as_bytes())],
            ))
        })
    });
    c.bench_function(
        "cache-aware: choose among 100 nodes, 4,000-token prompt",
        |b| {
            b.iter(|| {
                black_box(balancer.plan(
                    black_box(&table),
                    ApiKind::Ollama,
                    black_box("llama3.1:8b"),
                    Some(black_box(&key)),
                    1,
                ))
            })
        },
    );
    c.bench_function(
        "cache-aware: key and choice, 4,000-token prompt, 100 nodes",
        |b| {
            b.iter(|| {
                let key = PromptKey::of("llama3.1:8b", &[black_box(prompt.as_bytes())]);
                black_box(balancer.plan(&table, ApiKind::Ollama, "llama3.1:8b", Some(&key), 1))
            })
        },
    );
}

criterion_group!(benches, pick, cache_aware);
criterion_main!(benches);
