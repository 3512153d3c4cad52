//! What keygate adds per request on the forward path, audit off: the same keep-alive client sends
//! `POST /v1/payment_intents` with a 1 KiB form body straight to an in-process fake Stripe
//! (`direct`), then through an in-process keygate (`through_keygate`). The difference between the
//! two is keygate's cost: its CPU (authenticate, read body, key from cache, decide, re-frame,
//! forward, record) plus one loopback hop. Run with `cargo bench -p keygate --bench forward`.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate_policies::PolicySet;
use tokio::net::TcpListener;

const CUSTOMER_JSON: &str = r#"{"id":"pi_3BenchIntent","object":"payment_intent","amount":2000,"currency":"usd","status":"requires_payment_method"}"#;

async fn fake_stripe() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(|request: hyper::Request<Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    let mut response = hyper::Response::new(Full::new(Bytes::from_static(CUSTOMER_JSON.as_bytes())));
                    response.headers_mut().insert("request-id", http::HeaderValue::from_static("req_bench"));
                    Ok::<_, Infallible>(response)
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

async fn keygate_in_front_of(upstream: SocketAddr, token_hash: &str, key_file: &std::path::Path) -> SocketAddr {
    let url = format!("http://{upstream}");
    let env: Vec<(String, String)> = ["API", "FILES", "CONNECT", "METER_EVENTS"]
        .iter()
        .map(|host| (format!("KEYGATE_UPSTREAMS__{host}"), url.clone()))
        .chain([
            ("KEYGATE_LOG__LEVEL".to_owned(), "error".to_owned()),
            // The audit-off cost (P0); the audit writer has its own bench in auditlog/benches.
            ("KEYGATE_AUDIT__ENABLED".to_owned(), "false".to_owned()),
        ])
        .collect();
    let config = keygate::config::load(None, &env).unwrap();
    let key_ref = format!("file://{}", key_file.display());
    let policies = PolicySet::quickstart_allow_all("bench", token_hash, &key_ref);
    let gateway = keygate::run::build_gateway(config, policies).await.unwrap();
    keygate::run::preload_keys(&gateway).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(keygate::server::serve(listener, gateway, None, std::future::pending()));
    addr
}

fn request(addr: SocketAddr, token: &str, body: &Bytes) -> hyper::Request<Full<Bytes>> {
    hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/payment_intents"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("stripe-version", "2025-07-30.basil")
        .body(Full::new(body.clone()))
        .unwrap()
}

fn forward(c: &mut Criterion) {
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("stripe-key");
    std::fs::write(&key_file, "sk_test_51BenchKeyNotARealKey000000000000").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let minted = keygate::auth::mint_token();
    let token = minted.token.expose().to_owned();
    let (upstream, proxy) = runtime.block_on(async {
        let upstream = fake_stripe().await;
        let proxy = keygate_in_front_of(upstream, &minted.hash, &key_file).await;
        (upstream, proxy)
    });
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut form = String::from("amount=2000&currency=usd&payment_method_types[]=card&metadata[order_id]=");
    form.push_str(&"o".repeat(1024 - form.len()));
    let body = Bytes::from(form);

    let mut group = c.benchmark_group("forward");
    group.throughput(Throughput::Elements(1));
    for (name, addr) in [("direct", upstream), ("through_keygate", proxy)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let response = client.request(request(addr, &token, &body)).await.unwrap();
                    assert_eq!(response.status(), 200);
                    response.into_body().collect().await.unwrap();
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
