//! The audit writer's parts on one core, for exchanges of about 2 KiB (request and response):
//! one record redacted, compressed and sealed; a batch Parquet-encoded; the whole pipeline; and
//! the WAL's group commit (many concurrent `durability: sync` records sharing fsyncs); and the
//! same for `received` webhook events of about 2 KiB (`record_webhook`). Prints the lake bytes
//! per raw byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keygate_auditlog::crypto::{DataKey, row_aad};
use keygate_auditlog::parquet_io::{FileMeta, encode};
use keygate_auditlog::payload::prepare;
use keygate_auditlog::row::{ChainedRow, row_hash};
use keygate_auditlog::webhook::prepare_webhook;
use keygate_auditlog::{
    AuditConfig, AuditLog, Exchange, HttpMessage, LocalKek, SigningKey, WebhookKind, WebhookRecord,
};

const N: usize = 2000;

fn exchange(i: usize) -> Exchange {
    let mut ex = Exchange::new(uuid::Uuid::now_v7(), "POST", "/v1/payment_intents");
    ex.completed_at = SystemTime::now() + Duration::from_millis(40);
    ex.service = Some("checkout".into());
    ex.peer = "10.0.3.7:51234".into();
    ex.operation = Some("POST /v1/payment_intents".into());
    ex.stripe_host = Some("api.stripe.com".into());
    ex.idempotency_key = Some(format!("a3f1c2d4-{i:08}"));
    ex.request_id = Some(format!("req_{i:014}"));
    ex.status = 200;
    ex.amount = Some(1999);
    ex.currency = Some("usd".into());
    let req = format!(
        "amount=1999&currency=usd&customer=cus_{i:014}&payment_method=pm_card_visa&confirm=true&description=Order+{i}+for+customer&metadata[order_id]=ord_{i:010}&metadata[cart]=sku_1,sku_2,sku_3&receipt_email=buyer{i}%40example.com&payment_method_data[card][number]=4242424242424242&payment_method_data[card][cvc]=123"
    );
    let resp = format!(
        r#"{{"id":"pi_{i:024}","object":"payment_intent","amount":1999,"amount_capturable":0,"amount_received":1999,"application":null,"capture_method":"automatic","client_secret":"pi_{i:024}_secret_abcdefghijklmnopqrstuvw","confirmation_method":"automatic","created":1732900000,"currency":"usd","customer":"cus_{i:014}","description":"Order {i} for customer","last_payment_error":null,"latest_charge":"ch_{i:024}","livemode":false,"metadata":{{"order_id":"ord_{i:010}","cart":"sku_1,sku_2,sku_3"}},"next_action":null,"payment_method":"pm_{i:024}","payment_method_options":{{"card":{{"installments":null,"mandate_options":null,"network":null,"request_three_d_secure":"automatic"}}}},"payment_method_types":["card"],"receipt_email":"buyer{i}@example.com","status":"succeeded","charges":{{"object":"list","data":[{{"id":"ch_{i:024}","object":"charge","amount":1999,"paid":true,"status":"succeeded","payment_method_details":{{"card":{{"brand":"visa","last4":"4242","exp_month":12,"exp_year":2030,"funding":"credit","checks":{{"cvc_check":"pass","address_line1_check":null,"address_postal_code_check":"pass"}}}}}}}}],"has_more":false}}}}"#
    );
    ex.request = HttpMessage {
        start_line: "POST /v1/payment_intents HTTP/1.1".into(),
        headers: vec![
            ("authorization".into(), b"Bearer sk_kg_0123456789abcdefghij".to_vec()),
            ("content-type".into(), b"application/x-www-form-urlencoded".to_vec()),
            ("idempotency-key".into(), format!("a3f1c2d4-{i:08}").into_bytes()),
            ("stripe-version".into(), b"2024-06-20".to_vec()),
            ("user-agent".into(), b"Stripe/v1 PythonBindings/10.0.0".to_vec()),
        ],
        body: Bytes::from(req),
    };
    ex.response = Some(HttpMessage {
        start_line: "HTTP/1.1 200 OK".into(),
        headers: vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("request-id".into(), format!("req_{i:014}").into_bytes()),
            ("idempotency-key".into(), format!("a3f1c2d4-{i:08}").into_bytes()),
        ],
        body: Bytes::from(resp),
    });
    ex
}

/// A verified `payment_intent.succeeded` event of about 2 KiB, as Stripe sends it.
fn webhook(i: usize) -> WebhookRecord {
    let mut r = WebhookRecord::new(WebhookKind::Received, "stripe-main");
    r.stripe_event_id = Some(format!("evt_{i:024}"));
    r.event_type = Some("payment_intent.succeeded".into());
    r.livemode = Some(false);
    r.api_version = Some("2024-06-20".into());
    r.created = Some(1_732_900_000);
    r.status = Some(200);
    r.peer = Some("54.187.174.169:443".into());
    let object = format!(
        r#"{{"id":"pi_{i:024}","object":"payment_intent","amount":1999,"amount_received":1999,"capture_method":"automatic","client_secret":"pi_{i:024}_secret_abcdefghijklmnopqrstuvw","created":1732900000,"currency":"usd","customer":"cus_{i:014}","description":"Order {i} for customer","latest_charge":"ch_{i:024}","livemode":false,"metadata":{{"order_id":"ord_{i:010}","cart":"sku_1,sku_2,sku_3"}},"payment_method":"pm_{i:024}","payment_method_options":{{"card":{{"installments":null,"mandate_options":null,"network":null,"request_three_d_secure":"automatic"}}}},"payment_method_types":["card"],"receipt_email":"buyer{i}@example.com","status":"succeeded","charges":{{"object":"list","data":[{{"id":"ch_{i:024}","object":"charge","amount":1999,"paid":true,"status":"succeeded","payment_method_details":{{"card":{{"brand":"visa","last4":"4242","exp_month":12,"exp_year":2030,"funding":"credit","checks":{{"cvc_check":"pass","address_line1_check":null,"address_postal_code_check":"pass"}}}}}}}}],"has_more":false}}}}"#
    );
    r.body = Some(Bytes::from(format!(
        r#"{{"id":"evt_{i:024}","object":"event","api_version":"2024-06-20","created":1732900000,"data":{{"object":{object}}},"livemode":false,"pending_webhooks":2,"request":{{"id":"req_{i:014}","idempotency_key":"a3f1c2d4-{i:08}"}},"type":"payment_intent.succeeded"}}"#
    )));
    r
}

fn raw_len(ex: &Exchange) -> usize {
    let msg = |m: &HttpMessage| {
        m.start_line.len() + m.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>() + m.body.len()
    };
    msg(&ex.request) + ex.response.as_ref().map_or(0, msg)
}

fn chained_rows(exchanges: &[Exchange]) -> Vec<ChainedRow> {
    let (mut key, _) = DataKey::generate().unwrap();
    let mut head = [0u8; 32];
    exchanges
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let p = prepare(ex, 3).unwrap();
            let payload = key.seal(&row_aad("bench", 1, &p.columns.event_id), &p.compressed).unwrap();
            let seq = i as u64 + 1;
            let hash = row_hash(&head, "bench", seq, &p.columns, &payload);
            let row = ChainedRow { writer_id: "bench".into(), seq, columns: p.columns, payload, prev_hash: head, hash };
            head = hash;
            row
        })
        .collect()
}

/// The whole pipeline for `exchanges`; returns the Parquet file's bytes.
fn pipeline(exchanges: &[Exchange]) -> Vec<u8> {
    let rows = chained_rows(exchanges);
    encode(&rows, &file_meta(rows.len())).unwrap()
}

fn file_meta(rows: usize) -> FileMeta {
    FileMeta {
        table: keygate_auditlog::table::Table::Audit,
        writer_id: "bench".into(),
        first_seq: 1,
        last_seq: rows as u64,
        kek_id: "local:bench".into(),
        wrapped_key: vec![0; 60],
        chain_head_in: [0; 32],
        zstd_dictionaries: keygate_auditlog::dict::current_id().into_iter().collect(),
    }
}

fn bench(c: &mut Criterion) {
    let exchanges: Vec<Exchange> = (0..N).map(exchange).collect();
    let raw: usize = exchanges.iter().map(raw_len).sum();
    let lake = pipeline(&exchanges).len();
    eprintln!(
        "audit writer pipeline: {N} exchanges, {:.0} raw bytes each, lake bytes / raw bytes = {:.3}",
        raw as f64 / N as f64,
        lake as f64 / raw as f64
    );
    let mut g = c.benchmark_group("audit_writer");
    g.sample_size(20);

    g.throughput(Throughput::Elements(1));
    let (mut key, _) = DataKey::generate().unwrap();
    let one = &exchanges[0];
    g.bench_function("one_record_redact_compress_seal", |b| {
        b.iter(|| {
            let p = prepare(one, 3).unwrap();
            key.seal(&row_aad("bench", 1, &p.columns.event_id), &p.compressed).unwrap()
        })
    });

    let event = webhook(0);
    g.bench_function("one_webhook_event_redact_compress_seal", |b| {
        b.iter(|| {
            let (p, _) = prepare_webhook(&event, 3).unwrap();
            key.seal(&row_aad("bench", 1, &p.columns.event_id), &p.compressed.unwrap()).unwrap()
        })
    });

    g.throughput(Throughput::Elements(N as u64));
    let rows = chained_rows(&exchanges);
    let meta = file_meta(N);
    g.bench_function("parquet_encode_batch_of_2000", |b| b.iter(|| encode(&rows, &meta).unwrap()));
    g.bench_function("redact_compress_encrypt_parquet_2KiB", |b| b.iter(|| pipeline(&exchanges)));
    g.finish();

    wal_group_commit(c, &exchanges);
    merkle(c);
}

/// The Merkle tree's cost per row (the shipper appends each committed row's hash to its
/// writer's frontier), and an inclusion proof over a simulated writer of 10 million rows (the
/// tree part of `auditlog prove`; reading the writer's files comes on top).
fn merkle(c: &mut Criterion) {
    use keygate_auditlog::merkle::{Frontier, inclusion_proof, leaf_hash, root_of, verify_inclusion};
    let mut g = c.benchmark_group("audit_merkle");
    g.throughput(Throughput::Elements(1));
    let mut frontier = Frontier::new();
    let mut n = 0u64;
    g.bench_function("append_one_row_to_the_tree", |b| {
        b.iter(|| {
            n += 1;
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&n.to_le_bytes());
            frontier.push_row(&h);
        })
    });
    g.finish();
    const ROWS: u64 = 10_000_000;
    let leaves: Vec<[u8; 32]> = (0..ROWS)
        .map(|i| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&i.to_le_bytes());
            leaf_hash(&h)
        })
        .collect();
    let t = std::time::Instant::now();
    let root = root_of(&leaves);
    let root_time = t.elapsed();
    let t = std::time::Instant::now();
    let index = ROWS * 3 / 7;
    let path = inclusion_proof(&leaves, index).unwrap_or_default();
    let prove_time = t.elapsed();
    assert!(verify_inclusion(&leaves[index as usize], index, ROWS, &path, &root));
    // A proof file: header, index, one base64 line (44 characters) per path hash, the checkpoint
    // (about 190 bytes), and the row's JSON in base64 (about 4/3 of its columns and sealed payload).
    eprintln!(
        "audit merkle: {ROWS} rows simulated: root in {root_time:?}, inclusion proof in {prove_time:?}, {} path hashes = {} bytes of path lines",
        path.len(),
        path.len() * 45
    );
}

/// `durability: sync` records from 256 concurrent callers on a one-thread runtime (the writer
/// thread is the second thread, as in keygate): records per second through prepare, seal, WAL
/// write and the shared fsyncs, on this machine's disk (the system's temporary folder).
fn wal_group_commit(c: &mut Criterion, exchanges: &[Exchange]) {
    const CONCURRENT: usize = 256;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kek = std::sync::Arc::new(LocalKek::from_text(&hex::encode([7u8; 32])).unwrap());
    let cfg = AuditConfig {
        wal_dir: dir.path().join("wal"),
        lake: dir.path().join("lake").display().to_string(),
        kek: "env://UNUSED".into(),
        signing_key: "env://UNUSED".into(),
        ..AuditConfig::default()
    };
    let log = rt.block_on(AuditLog::open(&cfg, kek, SigningKey::generate())).unwrap();
    let batch: Vec<Exchange> = exchanges.iter().take(CONCURRENT).cloned().collect();
    let events: Vec<WebhookRecord> = (0..CONCURRENT).map(webhook).collect();
    let mut g = c.benchmark_group("audit_wal");
    g.sample_size(20);
    g.throughput(Throughput::Elements(CONCURRENT as u64));
    g.bench_function("group_commit_sync_256_concurrent", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for ex in &batch {
                    let log = log.clone();
                    let mut ex = ex.clone();
                    ex.event_id = uuid::Uuid::now_v7();
                    set.spawn(async move { log.record(ex, None).await });
                }
                while let Some(done) = set.join_next().await {
                    done.unwrap().unwrap();
                }
            })
        })
    });
    g.bench_function("webhook_group_commit_sync_256_concurrent", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for ev in &events {
                    let log = log.clone();
                    let mut ev = ev.clone();
                    ev.event_id = uuid::Uuid::now_v7();
                    set.spawn(async move { log.record_webhook(ev).await });
                }
                while let Some(done) = set.join_next().await {
                    done.unwrap().unwrap();
                }
            })
        })
    });
    g.finish();
    rt.block_on(log.shutdown()).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
